"""Integrity after re-synchronization (paper section 3.4; ``findlady_core.integrity``).

The scaling attack ``w -> (1 + k) w`` keeps every cosine at 1: only the norm check sees it,
and it must name exactly the neurons touched (by reference index), nothing else. A
function-preserving rescale (own weights x c, consumers x 1/c) is not a modification: it is
reported as ``rescaled`` and undone.
"""

from __future__ import annotations

import json

import pytest
import torch

from findlady_core import attacks
from findlady_core.errors import InputError
from findlady_core.integrity import check_integrity, correct_norms, undo_rescale
from findlady_core.permute import apply_permutations
from findlady_core.resync import resync
from findlady_core.spec import Spec
from findlady_core.trace import trace_spec
from findlady_examples import models

NEURONS = [3, 7, 11, 12, 30]


@pytest.fixture(scope="module")
def cnn_spec(mnist_cnn_spec) -> Spec:  # type: ignore[no-untyped-def]
    return mnist_cnn_spec


@pytest.fixture(scope="module")
def cnn(trained_mnist_cnn, cnn_spec):  # type: ignore[no-untyped-def]
    return trained_mnist_cnn[1], cnn_spec


def resynced(ref: dict[str, torch.Tensor], suspect: dict[str, torch.Tensor], spec: Spec) -> dict[str, torch.Tensor]:
    return resync(ref, suspect, spec, device="cpu").state_dict


def flagged_set(res) -> set[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return {(f["group"], f["neuron"]) for f in res.flagged}


def rescale(sd: dict[str, torch.Tensor], spec: Spec, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Function-preserving for ReLU layers: own parameters x c, consumers' inputs x 1/c."""
    out = dict(sd)
    for g in spec.groups:
        if g.name not in factors:
            continue
        c = factors[g.name]
        for m in g.members:
            t = out[m.tensor]
            shape = [1] * t.dim()
            shape[m.axis] = -1
            f = c.repeat_interleave(m.block).view(shape)
            out[m.tensor] = t * f if m.is_out else t / f
    return out


def test_untouched_permuted_copy_is_intact(cnn) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    sus = attacks.permute(ref, spec, seed=1).state_dict
    res = check_integrity(ref, resynced(ref, sus, spec), spec)
    assert res.status == "intact"
    assert res.flagged == [] and res.rescaled == []
    assert res.max_abs_log_norm_ratio < 1e-6
    # every neuron was looked at, the unpermuted classifier included
    assert res.neurons == spec.neurons + 10 and res.unpermuted_layers == ["fc2"]
    json.dumps(res.to_dict(), allow_nan=False)


@pytest.mark.parametrize("k", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("group", ["conv1", "fc1"])
def test_scaling_attack_flags_exactly_the_scaled_neurons(cnn, group: str, k: float) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    neurons = [n for n in NEURONS if n < spec.group(group).size]
    attacked = attacks.scale_neurons(ref, spec, group, neurons, k)
    sus = attacks.permute(attacked, spec, seed=2).state_dict  # every group shuffled afterwards
    res = check_integrity(ref, resynced(ref, sus, spec), spec)
    assert res.status == "modified"
    assert flagged_set(res) == {(group, n) for n in neurons}
    for f in res.flagged:
        assert f["norm_ratio"] == pytest.approx(1 + k, rel=1e-5)
        assert f["cosine"] > 1 - 1e-6  # the cosine alone is blind to this attack
    assert res.rescaled == []  # one-sided: consumers were not compensated
    # the option of the issue: correcting the norms undoes the attack
    fixed = correct_norms(ref, resynced(ref, sus, spec), spec, res.flagged)
    assert check_integrity(ref, fixed, spec).status == "intact"
    for name in ref:
        torch.testing.assert_close(fixed[name], ref[name], rtol=1e-5, atol=1e-7)


def test_tolerance_is_what_it_says(cnn) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    small = attacks.scale_neurons(ref, spec, "fc1", [4], 0.005)  # 0.5%: inside the 1% band
    assert check_integrity(ref, small, spec).status == "intact"
    big = attacks.scale_neurons(ref, spec, "fc1", [4], 0.05)
    assert check_integrity(ref, big, spec, tolerance=0.1).status == "intact"
    res = check_integrity(ref, big, spec, tolerance=0.04)
    assert flagged_set(res) == {("fc1", 4)}
    assert res.to_dict()["tolerance"] == 0.04


def test_change_of_direction_is_caught_by_the_cosine(cnn) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    sus = dict(ref)
    w = ref["fc1.weight"].clone()
    w[9] = w[9][torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))]  # same norm
    sus["fc1.weight"] = w
    res = check_integrity(ref, sus, spec)
    assert flagged_set(res) == {("fc1", 9)}
    (f,) = res.flagged
    assert f["norm_ratio"] == pytest.approx(1.0, abs=1e-6) and f["cosine"] < 0.5


def test_unpermuted_classifier_rows_are_checked(cnn) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    sus = dict(ref)
    b = ref["fc2.bias"].clone()
    b[3] += 1.0
    sus["fc2.bias"] = b
    assert flagged_set(check_integrity(ref, sus, spec)) == {("fc2", 3)}


def test_function_preserving_rescale_is_reported_and_undone(cnn) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    g = torch.Generator().manual_seed(3)
    factors = {grp.name: torch.exp(torch.empty(grp.size).uniform_(-0.7, 0.7, generator=g)) for grp in spec.groups}
    scaled = rescale(ref, spec, factors)
    model, x = models.build("mnist_cnn"), torch.rand(8, 1, 28, 28, generator=g)
    model.load_state_dict(ref)
    want = model(x)
    model.load_state_dict(scaled)
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)  # the function is unchanged

    sus = attacks.permute(scaled, spec, seed=4).state_dict
    back = resynced(ref, sus, spec)
    res = check_integrity(ref, back, spec)
    assert res.status == "intact" and res.flagged == []
    expected = {(n, i) for n, c in factors.items() for i in range(c.numel()) if abs(float(c[i].log())) > 0.01}
    assert {(r["group"], r["neuron"]) for r in res.rescaled} == expected
    for r in res.rescaled:
        assert r["factor"] == pytest.approx(float(factors[r["group"]][r["neuron"]]), rel=1e-5)
    # undone: the reference again, and undo_rescale does the same from the report's list
    for name in spec.tensors:
        torch.testing.assert_close(res.state_dict[name], ref[name], rtol=1e-4, atol=1e-6)
    again = undo_rescale(back, spec, res.rescaled)
    for name in spec.tensors:
        torch.testing.assert_close(again[name], res.state_dict[name])


def test_rescale_and_scaling_attack_are_told_apart(cnn) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    c = torch.ones(64)
    c[5] = 2.0
    sus = rescale(ref, spec, {"fc1": c})  # neuron 5: function-preserving
    sus = attacks.scale_neurons(sus, spec, "fc1", [20], 0.1)  # neuron 20: the attack
    res = check_integrity(ref, sus, spec)
    assert [(r["group"], r["neuron"]) for r in res.rescaled] == [("fc1", 5)]
    assert flagged_set(res) == {("fc1", 20)}


def test_running_statistics_are_checked() -> None:
    torch.manual_seed(0)
    model = models.build("resnet").eval()
    spec = trace_spec(model, models.example_input("resnet"))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    for k in ref:
        if k.endswith("running_var"):
            ref[k] = torch.rand(ref[k].shape) + 0.5
    sus = dict(ref)
    v = ref["layer2.0.bn1.running_var"].clone()
    v[6] *= 3
    sus["layer2.0.bn1.running_var"] = v
    res = check_integrity(ref, sus, spec)
    assert flagged_set(res) == {("layer2.0.conv1", 6)}
    (f,) = res.flagged
    assert f["norm_ratio"] == pytest.approx(1.0) and f["statistics_norm_ratio"] > 1.1


def test_perturbed_everywhere_is_modified_with_a_capped_list(cnn) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    pa = attacks.permute(ref, spec, seed=5)
    noisy = attacks.gaussian_noise(pa.state_dict, 0.1, targets=attacks.attack_targets(ref), seed=0)
    res = check_integrity(ref, resynced(ref, noisy, spec), spec)
    assert res.status == "modified" and res.rescaled == []
    d = res.to_dict(max_flagged=20)
    assert d["flagged_count"] == len(res.flagged) > 100
    assert len(d["flagged"]) == 20
    sev = [max(abs(torch.tensor(f["norm_ratio"]).log().item()) / 0.01, (1 - f["cosine"]) / 5e-5) for f in d["flagged"]]
    assert sev == sorted(sev, reverse=True)  # most deviant first
    assert sum(g["flagged"] for g in d["groups"].values()) == d["flagged_count"]


def test_bad_input(cnn) -> None:  # type: ignore[no-untyped-def]
    ref, spec = cnn
    bad = dict(ref)
    bad["fc1.weight"] = ref["fc1.weight"][:, :10]
    with pytest.raises(InputError, match="fc1.weight"):
        check_integrity(ref, bad, spec)
    with pytest.raises(InputError, match="tolerance"):
        check_integrity(ref, ref, spec, tolerance=0)
    with pytest.raises(InputError, match="nope"):
        correct_norms(ref, ref, spec, [{"group": "nope", "neuron": 0}])
    with pytest.raises(InputError, match="positive"):
        undo_rescale(ref, spec, [{"group": "fc1", "neuron": 0, "factor": -2.0}])
    perms = {"fc1": torch.arange(64)}
    assert check_integrity(ref, apply_permutations(ref, spec, perms), spec).status == "intact"


def test_rescales_among_noise_are_found_with_the_sums_reused(cnn) -> None:  # type: ignore[no-untyped-def]
    """Noise on every weight plus a function-preserving rescale of a few neurons: the rescale
    search takes its early stop and its plain sums once (rescale._Scales.plain_sums); the
    rescaled neurons are still the ones reported, and the check's numbers equal a check on the
    suspect with the rescale undone by hand (no reused sum survives an undo)."""
    import findlady_core.rescale as rescale_mod

    ref, spec = cnn
    g = spec.groups[0]
    c = torch.ones(g.size, dtype=torch.float32)
    c[[1, 4]] = torch.tensor([3.0, 0.2])
    noisy = attacks.gaussian_noise(ref, 0.001, targets=attacks.attack_targets(ref), seed=3)
    sus = rescale(noisy, spec, {g.name: c})
    res = check_integrity(ref, sus, spec)
    assert {(r["group"], r["neuron"]) for r in res.rescaled} >= {(g.name, 1), (g.name, 4)}
    plain = check_integrity(ref, undo_rescale(sus, spec, res.rescaled), spec, detect_rescale=False)
    assert [f["neuron"] for f in res.flagged] == [f["neuron"] for f in plain.flagged]
    assert res.min_cosine == pytest.approx(plain.min_cosine, abs=1e-12)
    # the early stop's restricted check answers as the full one on the neurons it counts
    scales = rescale_mod._Scales(spec, {k: v.shape for k, v in ref.items()})
    scales.log[g.name] = torch.log(c.double()) + 0.001 * torch.arange(g.size, dtype=torch.float64)
    big = scales.log[g.name].abs() > 0.01
    full = rescale_mod._consistent(scales, ref, sus, g, 0.01, 5e-5)
    only = rescale_mod._consistent(scales, ref, sus, g, 0.01, 5e-5, only=big)
    assert torch.equal(full[big], only[big]) and bool(only[~big].all())
