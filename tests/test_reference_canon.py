"""The reference's own duplicate and dead neurons (issue 14, Build 1: "and in the reference, which
may carry its own dead or duplicate neurons").

A reference MLP with a planted duplicate pair and a dead neuron in its first hidden layer; the
thief merges the pair, drops the dead neuron and permutes every group: a narrower suspect with
the reference's function. ``verify`` canonicalizes the reference (``findlady_core.canon.refcanon``)
and must say ``match`` with integrity intact; the re-synchronized suspect, expanded back to the
reference's shapes, computes the reference's outputs.
"""

from __future__ import annotations

import pytest
import torch

from findlady_core import attack_steps
from findlady_core.canon.widths import resized_spec
from findlady_core.report import reference_null, verify
from findlady_core.trace import trace_spec
from findlady_examples import data, models, train

A, B, DEAD = 5, 17, 40  # layers.0 neurons: B a copy of A's incoming parameters; DEAD without outgoing weights


def _outputs(sd) -> torch.Tensor:  # type: ignore[no-untyped-def]
    sizes = (64, sd["layers.0.weight"].shape[0], sd["layers.2.weight"].shape[0], 10)
    m = models.MLP(sizes)
    m.load_state_dict(sd)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return m(x)


def _planted(sd) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    sd = {k: v.clone() for k, v in sd.items()}
    sd["layers.0.weight"][B] = sd["layers.0.weight"][A]
    sd["layers.0.bias"][B] = sd["layers.0.bias"][A]
    sd["layers.2.weight"][:, DEAD] = 0
    return sd


def _thief(sd) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Merge B into A (outgoing weights summed), drop DEAD: 126 neurons, the same function."""
    sd = {k: v.clone() for k, v in sd.items()}
    sd["layers.2.weight"][:, A] += sd["layers.2.weight"][:, B]
    keep = torch.tensor([i for i in range(sd["layers.0.weight"].shape[0]) if i not in (B, DEAD)])
    sd["layers.0.weight"] = sd["layers.0.weight"][keep].contiguous()
    sd["layers.0.bias"] = sd["layers.0.bias"][keep].contiguous()
    sd["layers.2.weight"] = sd["layers.2.weight"][:, keep].contiguous()
    return sd


@pytest.fixture(scope="module")
def case(trained_mlp):  # type: ignore[no-untyped-def]
    spec = trace_spec(models.build("mlp"), models.example_input("mlp"))
    ref = _planted(trained_mlp[1])
    return ref, spec, reference_null(ref, spec, device="cpu")


def _permuted(sd, spec, seed: int = 3):  # type: ignore[no-untyped-def]
    """Every group permuted; the spec's sizes taken from ``sd`` (the narrower suspect's)."""
    narrow = resized_spec(spec, {"layers.0": sd["layers.0.weight"].shape[0]})
    ctx = attack_steps.Context(narrow, seed=seed, truth={g.name: torch.arange(g.size) for g in narrow.groups})
    out, _ = attack_steps.run_pipeline(sd, {"permute": ["all"]}, ctx)
    return out, ctx.truth


def test_merged_and_dropped_reference_neurons_are_a_match(case) -> None:  # type: ignore[no-untyped-def]
    ref, spec, null = case
    sus, truth = _permuted(_thief(ref), spec)
    assert sus["layers.0.weight"].shape[0] == ref["layers.0.weight"].shape[0] - 2
    assert torch.allclose(_outputs(sus), _outputs(ref), atol=1e-5)  # the thief kept the function
    resynced = {}
    report = verify(ref, sus, spec, device="cpu", null_margin=null, on_resynced=resynced.update)
    assert report["verdict"] == "match", report["reasons"]
    assert report["integrity"]["status"] == "intact", report["integrity"]["flagged"][:3]
    side = [t for t in report["resync"]["transforms"] if t.get("side") == "reference"]
    assert sorted((t["kind"], t["neurons"]) for t in side) == [("drop", [DEAD]), ("merge", [A, B])]
    assert not [t for t in report["resync"]["transforms"] if not t["function_preserving"]]  # no padding
    # at the reference's shapes, the reference's function
    assert resynced["layers.0.weight"].shape == ref["layers.0.weight"].shape
    assert torch.allclose(_outputs(resynced), _outputs(ref), atol=1e-5)
    # every suspect neuron found: canonical neuron at reference position i is suspect neuron truth
    groups = {g["name"]: g for g in report["resync"]["groups"]}
    kept = [i for i in range(ref["layers.0.weight"].shape[0]) if i not in (B, DEAD)]
    p = groups["layers.0"]["permutation"]
    assert [p[i] for i in kept] == truth["layers.0"].tolist()
    assert groups["layers.2"]["permutation"] == truth["layers.2"].tolist()


def test_a_plain_copy_of_the_planted_reference_is_untouched(case) -> None:  # type: ignore[no-untyped-def]
    """The reference's duplicates are only merged when the suspect is narrower."""
    ref, spec, null = case
    sus, _ = _permuted(ref, spec)
    resynced = {}
    report = verify(ref, sus, spec, device="cpu", null_margin=null, on_resynced=resynced.update)
    assert report["verdict"] == "match"
    assert not [t for t in report["resync"]["transforms"] if t.get("side") == "reference"]
    assert all(torch.equal(resynced[k], v) for k, v in ref.items())


def test_a_narrower_unrelated_model_is_no_match(case) -> None:  # type: ignore[no-untyped-def]
    ref, spec, null = case
    torch.manual_seed(4)
    m = models.MLP((64, 126, 64, 10))
    train.train(m, data.digits(0)[0], epochs=10, lr=0.1, seed=4, batch_size=64)
    other = {k: v.detach().clone() for k, v in m.state_dict().items()}
    report = verify(ref, other, spec, device="cpu", null_margin=null)
    assert report["verdict"] == "no_match", report["reasons"]
