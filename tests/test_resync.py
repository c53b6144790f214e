"""Re-synchronization: recovered permutations equal the truth (issue 2 must-shows)."""

from __future__ import annotations

import pytest
import torch

from findlady_core import attacks
from findlady_core.errors import InputError
from findlady_examples import models, train
from findlady_core.permute import (
    apply_permutations,
    psi,
    psi_composed,
    random_permutations,
    recovering_permutations,
)
from findlady_core.resync import _assign, resync
from findlady_core.spec import Spec
from findlady_core.trace import trace_spec


def _shapes(sd):
    return {k: v.shape for k, v in sd.items()}


def _all_permuted(sd, spec, seed=3):
    q = random_permutations(spec, seed=seed)
    return apply_permutations(sd, spec, q), recovering_permutations(spec, q, _shapes(sd))


@pytest.fixture(scope="module")
def traced():
    """Traced specs of the trained example models."""
    out = {}
    for name in ("mlp", "vgg", "resnet"):
        model, sd = train.trained(name, 0)
        out[name] = (model, sd, trace_spec(model, models.example_input(name)))
    return out


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet"])
def test_every_group_permuted_is_recovered_exactly(traced, name):
    model, sd, spec = traced[name]
    sus, truth = _all_permuted(sd, spec)
    assert any(not torch.equal(sus[k], sd[k]) for k in spec.tensors)
    r = resync(sd, sus, spec, device="cpu")
    per, total = psi(spec, truth, r.permutations)
    assert total == 100.0, per
    for k in sd:
        assert torch.equal(r.state_dict[k], sd[k]), k
    assert all(g.mean_similarity > 0.9999 for g in r.groups)
    assert r.log10_p_value < -50


def test_unpermuted_copy_moves_nothing(traced):
    _, sd, spec = traced["resnet"]
    r = resync(sd, {k: v.clone() for k, v in sd.items()}, spec, device="cpu")
    assert r.moved == 0
    assert all(g.ambiguous == 0 for g in r.groups)


def test_report_block_follows_the_convention(traced):
    """``permutation`` in the report is p with resynced = suspect.index_select(axis, p)."""
    _, sd, spec = traced["mlp"]
    sus, truth = _all_permuted(sd, spec, seed=5)
    block = resync(sd, sus, spec, device="cpu").to_dict()
    for g in block["groups"]:
        assert g["permutation"] == truth[g["name"]].tolist()
        assert g["moved"] == int((truth[g["name"]] != torch.arange(g["size"])).sum())
        assert g["min_margin"] > 0
    assert block["similarity_p_value"] < 1e-50


def test_assignment_is_a_bijection_when_argmax_is_not():
    s = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.2, 0.1], [0.1, 0.2, 0.3]])
    assert torch.unique(s.argmax(1)).numel() < 3  # greedy maps two neurons to one place
    p = _assign(s)
    assert sorted(p.tolist()) == [0, 1, 2]
    assert p.tolist() == [1, 0, 2]


def test_paper_method_on_one_layer_matches_greedy_argmax(traced):
    _, sd, spec = traced["vgg"]
    g = models.VGGStyle.penultimate
    atk = attacks.permute(sd, spec, [g], seed=2)
    r = resync(sd, atk.state_dict, spec, method="paper", groups=[g], device="cpu")
    assert torch.equal(r.permutations[g], atk.truth[g])


def test_shape_mismatch_is_refused(traced):
    _, sd, spec = traced["mlp"]
    bad = dict(sd)
    name = next(iter(spec.tensors))
    bad[name] = torch.zeros(*[s + 1 for s in sd[name].shape])
    with pytest.raises(InputError, match=name):
        resync(sd, bad, spec)


# --- the paper's setting: the penultimate layer permuted and attacked (VGG-style, no BN) -------


def _paper_setting(traced, attack):
    model, sd, spec = traced["vgg"]
    g = models.VGGStyle.penultimate
    atk = attacks.permute(sd, spec, [g], seed=11)
    sus = attack(model, atk.state_dict, spec, g)
    out = {}
    for method in ("findlady", "paper"):
        r = resync(sd, sus, spec, method=method, groups=[g], device="cpu")
        out[method] = psi(spec.select([g]), {g: atk.truth[g]}, r.permutations)[1]
    return out


@pytest.mark.parametrize("omega", [1.0, 2.0, 5.0])
def test_paper_setting_noise(traced, omega):
    psis = _paper_setting(
        traced,
        lambda m, sd, spec, g: attacks.gaussian_noise(
            sd, omega, targets=attacks.attack_targets(sd, spec, g), seed=1
        ),
    )
    assert psis["findlady"] == 100.0


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_paper_setting_quantization(traced, bits):
    psis = _paper_setting(
        traced, lambda m, sd, spec, g: attacks.quantize(sd, bits, targets=attacks.attack_targets(sd, spec, g))
    )
    assert psis["findlady"] == 100.0


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.95])
def test_paper_setting_pruning(traced, fraction):
    psis = _paper_setting(
        traced, lambda m, sd, spec, g: attacks.prune(sd, fraction, targets=attacks.attack_targets(sd, spec, g))
    )
    assert psis["findlady"] == 100.0


@pytest.mark.parametrize("theta", [0.02, 0.10])
def test_paper_setting_finetuning(traced, theta):
    cfg = train.config("vgg")
    train_ds, _ = __import__("findlady_examples.data", fromlist=["load"]).load("mnist5k", cfg.data_seed)

    def ft(model, sd, spec, g):
        return train.finetune(model, sd, train_ds, fraction=theta, original_epochs=cfg.epochs, seed=7, lr=cfg.lr)

    psis = _paper_setting(traced, ft)
    assert psis["findlady"] == 100.0


# --- whole-model setting: every group permuted, noise on every weight tensor -------------------


def test_whole_model_noise_resnet_ours_beats_paper(traced):
    _, sd, spec = traced["resnet"]
    sus, truth = _all_permuted(sd, spec, seed=9)
    rows = {}
    for omega in (0.1, 0.5, 1.0, 2.0):
        noisy = attacks.gaussian_noise(sus, omega, targets=attacks.attack_targets(sus), seed=4)
        ours = psi(spec, truth, resync(sd, noisy, spec, device="cpu").permutations)[1]
        paper = psi(spec, truth, resync(sd, noisy, spec, method="paper", device="cpu").permutations)[1]
        rows[omega] = (ours, paper)
    print("ResNet whole-model Psi (ours, paper):", rows)
    assert rows[0.1][0] == rows[0.5][0] == rows[1.0][0] == 100.0, rows
    assert all(o >= p for o, p in rows.values()), rows


# --- real models ------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_every_group_recovered_and_noise(minilm):
    _, sd = minilm
    from findlady_core.catalog import bert_spec

    spec = bert_spec(sd)
    sus, truth = _all_permuted(sd, spec, seed=1)
    r = resync(sd, sus, spec, device="cpu")
    assert psi(spec, truth, r.permutations)[1] == 100.0
    assert all(torch.equal(r.state_dict[k], sd[k]) for k in spec.tensors)
    noisy = attacks.gaussian_noise(sus, 1.0, targets=attacks.attack_targets(sus), seed=2)
    ours = psi(spec, truth, resync(sd, noisy, spec, device="cpu").permutations)[1]
    paper = psi(spec, truth, resync(sd, noisy, spec, method="paper", device="cpu").permutations)[1]
    assert ours == 100.0
    assert paper < ours


@pytest.mark.slow
def test_efficientnet_every_group_recovered(efficientnet):
    model, sd = efficientnet
    spec = trace_spec(model, torch.randn(1, 3, 224, 224), check=False)
    sus, truth = _all_permuted(sd, spec, seed=2)
    r = resync(sd, sus, spec, device="cpu")
    assert psi(spec, truth, r.permutations)[1] == 100.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_result(traced):
    _, sd, spec = traced["resnet"]
    sus, _ = _all_permuted(sd, spec)
    noisy = attacks.gaussian_noise(sus, 0.5, targets=attacks.attack_targets(sus), seed=1)
    a = resync(sd, noisy, spec, device="cpu")
    b = resync(sd, noisy, spec, device="cuda")
    for g in spec.names:
        assert torch.equal(a.permutations[g], b.permutations[g])


def test_nested_spec_round_trip():
    """Heads with dims inside heads: the recovery of inner groups follows the outer one."""
    torch.manual_seed(0)
    sd = {"q": torch.randn(8, 5), "k": torch.randn(8, 5), "o": torch.randn(5, 8), "emb": torch.randn(50, 5)}
    groups = [
        {"name": "heads", "size": 2, "members": [{"tensor": "q", "axis": 0, "block": 4}, {"tensor": "k", "axis": 0, "block": 4},
                                                 {"tensor": "o", "axis": 1, "block": 4}]},
    ] + [
        {"name": f"h{h}", "size": 4, "members": [{"tensor": "q", "axis": 0, "offset": 4 * h}, {"tensor": "k", "axis": 0, "offset": 4 * h}]}
        for h in range(2)
    ]
    spec = Spec.from_dict({"format": "findlady.spec/1", "groups": groups})
    spec.validate(sd)
    q = {"heads": torch.tensor([1, 0]), "h0": torch.tensor([3, 1, 0, 2]), "h1": torch.tensor([1, 2, 3, 0])}
    sus = apply_permutations(sd, spec, q)
    truth = recovering_permutations(spec, q, _shapes(sd))
    back = apply_permutations(sus, spec, truth)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    r = resync(sd, sus, spec, device="cpu")
    assert psi(spec, truth, r.permutations)[1] == 100.0
    assert psi_composed(spec, q, r.permutations, _shapes(sd)) == 100.0
    wrong = dict(r.permutations, h1=torch.arange(4))
    assert psi_composed(spec, q, wrong, _shapes(sd)) < 100.0


@pytest.fixture(scope="module")
def minilm():
    from findlady_examples.pretrained import load_minilm

    return load_minilm()


@pytest.fixture(scope="module")
def efficientnet():
    model = models.efficientnet_lite0()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}
