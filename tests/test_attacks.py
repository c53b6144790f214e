"""Attacks (paper 3.1, 3.4): statistics, determinism, exact targets, permutation round trip."""

from __future__ import annotations

import pytest
import torch

from findlady_core.attacks import (
    attack_targets,
    gaussian_noise,
    permute,
    prune,
    quantize,
    scale_neurons,
)
from findlady_core.errors import InputError
from findlady_core.permute import apply_permutations
from findlady_core.spec import Group, Member, Spec


def mlp_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    """A 3-layer MLP 20 -> 64 -> 48 -> 10, with an integer buffer that must pass through."""
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(64, 20, generator=g),
        "fc1.bias": torch.randn(64, generator=g),
        "fc2.weight": torch.randn(48, 64, generator=g),
        "fc2.bias": torch.randn(48, generator=g),
        "fc3.weight": torch.randn(10, 48, generator=g),
        "fc3.bias": torch.randn(10, generator=g),
        "steps": torch.tensor(5),
    }


SPEC = Spec((
    Group("fc1", 64, (Member("fc1.weight", 0), Member("fc1.bias", 0), Member("fc2.weight", 1))),
    Group("fc2", 48, (Member("fc2.weight", 0), Member("fc2.bias", 0), Member("fc3.weight", 1))),
))


def forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ sd["fc1.weight"].T + sd["fc1.bias"])
    h = torch.relu(h @ sd["fc2.weight"].T + sd["fc2.bias"])
    return h @ sd["fc3.weight"].T + sd["fc3.bias"]


def copy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sd.items()}


def assert_equal_sd(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


# ---------------------------------------------------------------- targets


def test_targets_default_are_matrices() -> None:
    assert attack_targets(mlp_sd()) == ["fc1.weight", "fc2.weight", "fc3.weight"]


def test_targets_of_a_group_are_its_own_weight_and_bias() -> None:
    sd = mlp_sd()
    assert attack_targets(sd, SPEC, "fc1") == ["fc1.weight", "fc1.bias"]  # not fc2.weight (role in)
    assert attack_targets(sd, SPEC, "fc2") == ["fc2.weight", "fc2.bias"]


def test_group_targets_skip_running_statistics() -> None:
    sd = {"c.weight": torch.randn(4, 3), "bn.weight": torch.ones(4), "bn.bias": torch.zeros(4),
          "bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4)}
    spec = Spec((Group("c", 4, tuple(Member(k, 0) for k in sd)),))
    assert attack_targets(sd, spec, "c") == ["c.weight", "bn.weight", "bn.bias"]


def test_targets_need_known_group_and_spec() -> None:
    with pytest.raises(InputError, match="needs a spec"):
        attack_targets(mlp_sd(), None, "fc1")
    with pytest.raises(InputError, match="no group named"):
        attack_targets(mlp_sd(), SPEC, "fc9")


# ---------------------------------------------------------------- noise


@pytest.mark.parametrize("omega", [0.01, 0.1, 0.5])
def test_noise_relative_std_is_omega(omega: float) -> None:
    g = torch.Generator().manual_seed(3)
    sd = {"w": torch.randn(400, 300, generator=g) * 0.05 + 0.2}
    out = gaussian_noise(sd, omega, targets=["w"], seed=1)
    rel = float((out["w"] - sd["w"]).std() / sd["w"].std())
    assert abs(rel - omega) < 0.02 * omega
    assert abs(float((out["w"] - sd["w"]).mean())) < 0.01 * omega * float(sd["w"].std())


def test_noise_deterministic_and_only_targets() -> None:
    sd = mlp_sd()
    before = copy(sd)
    targets = attack_targets(sd, SPEC, "fc1")
    a = gaussian_noise(sd, 0.1, targets=targets, seed=7)
    b = gaussian_noise(sd, 0.1, targets=targets, seed=7)
    c = gaussian_noise(sd, 0.1, targets=targets, seed=8)
    assert_equal_sd(a, b)
    assert changed(a, c) == {"fc1.weight", "fc1.bias"}
    assert changed(sd, a) == {"fc1.weight", "fc1.bias"}
    assert_equal_sd(sd, before)  # input untouched
    # a tensor's noise does not depend on which other tensors are attacked
    only_w = gaussian_noise(sd, 0.1, targets=["fc1.weight"], seed=7)
    assert torch.equal(only_w["fc1.weight"], a["fc1.weight"])


def test_noise_zero_is_identity_and_keeps_dtype() -> None:
    sd = {"w": torch.randn(8, 8).half()}
    out = gaussian_noise(sd, 0.0, targets=["w"], seed=0)
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], sd["w"])


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_levels(bits: int) -> None:
    sd = mlp_sd()
    before = copy(sd)
    targets = attack_targets(sd)
    out = quantize(sd, bits, targets=targets)
    for name in targets:
        w, q = sd[name], out[name]
        assert q.dtype == w.dtype and q.shape == w.shape
        assert 2 <= q.unique().numel() <= 2**bits
        assert torch.isclose(q.min(), w.min()) and torch.isclose(q.max(), w.max())
        step = float(w.max() - w.min()) / (2**bits - 1)
        assert float((q - w).abs().max()) <= step / 2 + 1e-5
    assert changed(sd, out) == set(targets)
    assert_equal_sd(sd, before)


def test_quantize_16_bits_nearly_lossless() -> None:
    sd = mlp_sd()
    out = quantize(sd, 16, targets=["fc2.weight"])
    w = sd["fc2.weight"]
    rel = float((out["fc2.weight"] - w).norm() / w.norm())
    assert 0 < rel < 1e-4


def test_quantize_constant_tensor_unchanged() -> None:
    sd = {"w": torch.full((3, 3), 0.25)}
    assert torch.equal(quantize(sd, 2, targets=["w"])["w"], sd["w"])


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.75])
def test_prune_per_layer_fraction(fraction: float) -> None:
    sd = mlp_sd()
    targets = attack_targets(sd)
    out = prune(sd, fraction, targets=targets)
    for name in targets:
        w, p = sd[name], out[name]
        zeros = p == 0
        assert int(zeros.sum()) == round(fraction * w.numel())
        if zeros.any() and (~zeros).any():  # the smallest magnitudes went, the rest is untouched
            assert float(w[zeros].abs().max()) <= float(w[~zeros].abs().min())
        assert torch.equal(p[~zeros], w[~zeros])


def test_prune_global_fraction() -> None:
    sd = mlp_sd()
    sd["fc3.weight"] = sd["fc3.weight"] * 10  # larger weights: pruned less under a global threshold
    targets = attack_targets(sd)
    out = prune(sd, 0.4, targets=targets, scope="global")
    n = sum(sd[t].numel() for t in targets)
    zeros = sum(int((out[t] == 0).sum()) for t in targets)
    assert zeros == round(0.4 * n)
    per = {t: float((out[t] == 0).float().mean()) for t in targets}
    assert per["fc3.weight"] < 0.1 < per["fc1.weight"]
    kept_min = min(float(out[t][out[t] != 0].abs().min()) for t in targets)
    cut_max = max(float(sd[t][out[t] == 0].abs().max()) for t in targets if (out[t] == 0).any())
    assert cut_max <= kept_min


# ---------------------------------------------------------------- scaling neurons


@pytest.mark.parametrize("k", [0.25, -0.5])
def test_scale_neurons_exactly_those_rows(k: float) -> None:
    sd = mlp_sd()
    before = copy(sd)
    neurons = [3, 17, 40]
    out = scale_neurons(sd, SPEC, "fc1", neurons, k)
    assert changed(sd, out) == {"fc1.weight", "fc1.bias"}
    others = [i for i in range(64) if i not in neurons]
    for name in ("fc1.weight", "fc1.bias"):
        assert torch.equal(out[name][neurons], sd[name][neurons] * (1 + k))
        assert torch.equal(out[name][others], sd[name][others])
    assert_equal_sd(sd, before)


def test_scale_block_member_scales_whole_block() -> None:
    sd = {"q.weight": torch.randn(12, 5), "q.bias": torch.randn(12)}
    spec = Spec((Group("heads", 3, (Member("q.weight", 0, block=4), Member("q.bias", 0, block=4))),))
    out = scale_neurons(sd, spec, "heads", [1], 1.0)
    assert torch.equal(out["q.weight"][4:8], 2 * sd["q.weight"][4:8])
    assert torch.equal(out["q.weight"][:4], sd["q.weight"][:4])
    assert torch.equal(out["q.weight"][8:], sd["q.weight"][8:])
    assert torch.equal(out["q.bias"][4:8], 2 * sd["q.bias"][4:8])


# ---------------------------------------------------------------- permutation


def test_permute_truth_round_trip() -> None:
    sd = mlp_sd()
    before = copy(sd)
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(9))
    res = permute(sd, SPEC, None, seed=4)
    assert changed(sd, res.state_dict) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight"}
    assert torch.allclose(forward(res.state_dict, x), forward(sd, x), rtol=1e-5, atol=1e-4)  # same function
    for name, q in res.attack.items():
        assert torch.equal(res.truth[name], torch.argsort(q))
    assert_equal_sd(apply_permutations(res.state_dict, SPEC, res.truth), sd)
    assert_equal_sd(sd, before)
    again = permute(sd, SPEC, None, seed=4)
    other = permute(sd, SPEC, None, seed=5)
    assert all(torch.equal(again.attack[n], res.attack[n]) for n in SPEC.names)
    assert not all(torch.equal(other.attack[n], res.attack[n]) for n in SPEC.names)


def test_permute_one_group_then_noise_composes() -> None:
    sd = mlp_sd()
    res = permute(sd, SPEC, ["fc2"], seed=1)
    assert set(res.attack) == {"fc2"}
    assert torch.equal(res.state_dict["fc1.weight"], sd["fc1.weight"])
    noisy = gaussian_noise(res.state_dict, 0.01, targets=attack_targets(res.state_dict), seed=0)
    back = apply_permutations(noisy, SPEC, res.truth)
    rel = float((back["fc2.weight"] - sd["fc2.weight"]).std() / sd["fc2.weight"].std())
    assert rel < 0.02  # re-synchronized, only the noise remains


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda sd: gaussian_noise(sd, -0.1, targets=["fc1.weight"], seed=0), "omega"),
        (lambda sd: gaussian_noise(sd, float("nan"), targets=["fc1.weight"], seed=0), "omega"),
        (lambda sd: gaussian_noise(sd, 0.1, targets=["nope"], seed=0), "'nope' is not in the weights"),
        (lambda sd: gaussian_noise(sd, 0.1, targets=["steps"], seed=0), "not floating point"),
        (lambda sd: gaussian_noise(sd, 0.1, targets=[], seed=0), "empty target"),
        (lambda sd: gaussian_noise(sd, 0.1, targets="fc1.weight", seed=0), "list of tensor names"),
        (lambda sd: quantize(sd, 0, targets=["fc1.weight"]), "bits"),
        (lambda sd: quantize(sd, 33, targets=["fc1.weight"]), "bits"),
        (lambda sd: prune(sd, 1.0, targets=["fc1.weight"]), "fraction"),
        (lambda sd: prune(sd, -0.1, targets=["fc1.weight"]), "fraction"),
        (lambda sd: prune(sd, 0.1, targets=["fc1.weight"], scope="row"), "scope"),
        (lambda sd: scale_neurons(sd, SPEC, "fc1", [64], 0.1), "neuron 64 is not in group"),
        (lambda sd: scale_neurons(sd, SPEC, "fc1", [-1], 0.1), "neuron -1"),
        (lambda sd: scale_neurons(sd, SPEC, "fc1", [2, 2], 0.1), "twice"),
        (lambda sd: scale_neurons(sd, SPEC, "fc1", [], 0.1), "no neurons"),
        (lambda sd: scale_neurons(sd, SPEC, "fc1", [1], float("inf")), "finite"),
        (lambda sd: permute(sd, SPEC, ["fc7"], seed=0), "no group named"),
        (lambda sd: permute({"fc1.weight": sd["fc1.weight"]}, SPEC, None, seed=0), "not in the weights"),
    ],
)
def test_bad_arguments(call, match: str) -> None:
    with pytest.raises(InputError, match=match):
        call(mlp_sd())
