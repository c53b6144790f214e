"""The report and its verdict (``findlady_core.report``, issue 3 "must show").

The watermarked MNIST CNN carries a 64-bit Uchida key on ``conv2.weight``; permuting the
``conv1`` group permutes that layer's input channels, which scrambles the read-out until the
suspect is re-synchronized. Negative controls are the same architecture trained from other
seeds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from findlady_core import attacks
from findlady_core.errors import InputError, KeyFileError, WeightsError
from findlady_core.report import FORMAT, SIMILARITY_THRESHOLD, decide, reference_null, verify
from findlady_core.spec import Spec
from findlady_core.watermark import detect, generate_key
from findlady_examples import train

NEURONS = [2, 9, 17, 40, 63]


@pytest.fixture(scope="module")
def spec(mnist_cnn_spec) -> Spec:  # type: ignore[no-untyped-def]
    return mnist_cnn_spec


@pytest.fixture(scope="module")
def wm(watermarked_mnist_cnn, spec):  # type: ignore[no-untyped-def]
    """(reference state dict, key, reference null) of the watermarked CNN."""
    _, ref, key = watermarked_mnist_cnn
    assert key.layer == "conv2.weight"
    assert any(m.tensor == key.layer and not m.is_out for m in spec.group("conv1").members)
    return ref, key, reference_null(ref, spec, device="cpu")


def run(ref, sus, spec, key, null):  # type: ignore[no-untyped-def]
    report = verify(ref, sus, spec, key=key, device="cpu", null_margin=null)
    json.dumps(report, allow_nan=False)  # strict JSON, whatever happened
    return report


def flagged(report) -> set[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return {(f["group"], f["neuron"]) for f in report["integrity"]["flagged"]}


def test_permuted_watermarked_copy_is_a_match(wm, spec) -> None:  # type: ignore[no-untyped-def]
    ref, key, null = wm
    sus = attacks.permute(ref, spec, seed=1).state_dict
    report = run(ref, sus, spec, key, null)
    w = report["watermark"]
    assert 16 <= w["bit_errors_before_resync"] <= 48  # near T/2 = 32: the mark is unreadable
    assert w["bit_errors"] == 0 and w["bits"] == 64
    assert w["p_value"] < 1e-15 and w["detected"]
    assert w["log10_p_value"] == pytest.approx(math.log10(w["p_value"]))
    assert report["verdict"] == "match"
    assert report["integrity"]["status"] == "intact" and report["integrity"]["flagged"] == []
    assert "watermark detected: 0/64 bit errors" in " ".join(report["reasons"])
    assert f"were {w['bit_errors_before_resync']}/64 before re-synchronization" in " ".join(report["reasons"])
    # the report's shape (``findlady_core.report``)
    assert report["format"] == FORMAT
    assert {"format", "verdict", "reasons", "reference", "suspect", "resync", "integrity", "watermark", "timings",
            "thresholds"} <= set(report)
    assert set(report["timings"]) >= {"load", "resync", "integrity", "watermark"}
    assert report["suspect"]["parameters"] == sum(t.numel() for t in sus.values() if t.is_floating_point())
    assert len(report["reference"]["sha256"]) == 64
    assert report["thresholds"]["watermark_alpha"] == 1e-6 and report["thresholds"]["integrity_tolerance"] == 0.01
    for g in report["resync"]["groups"]:
        assert sorted(g["permutation"]) == list(range(g["size"]))
        assert {"moved", "mean_similarity", "min_margin", "ambiguous"} <= set(g)
    assert report["resync"]["similarity"]["similar"]


@pytest.mark.parametrize("attack", ["quantize8", "prune50"])
def test_watermark_survives_quantization_and_pruning(wm, spec, attack: str) -> None:  # type: ignore[no-untyped-def]
    ref, key, null = wm
    pa = attacks.permute(ref, spec, seed=2)
    targets = attacks.attack_targets(ref)  # every layer
    if attack == "quantize8":
        sus = attacks.quantize(pa.state_dict, 8, targets=targets)
    else:
        sus = attacks.prune(pa.state_dict, 0.5, targets=targets)
    report = run(ref, sus, spec, key, null)
    w = report["watermark"]
    assert w["detected"] and w["p_value"] < 1e-15, w
    assert w["bit_errors_before_resync"] >= 16
    assert report["verdict"] == "match_modified"
    assert report["integrity"]["status"] == "modified"
    assert any("differ from the reference beyond the 1% tolerance" in r for r in report["reasons"])


@pytest.mark.parametrize("k", [0.05, 0.1, 0.5])
def test_scaling_attack_is_match_modified_naming_the_neurons(wm, spec, k: float) -> None:  # type: ignore[no-untyped-def]
    ref, key, null = wm
    attacked = attacks.scale_neurons(ref, spec, "fc1", NEURONS, k)
    sus = attacks.permute(attacked, spec, seed=3).state_dict
    report = run(ref, sus, spec, key, null)
    assert report["verdict"] == "match_modified"
    assert flagged(report) == {("fc1", n) for n in NEURONS}
    assert report["integrity"]["flagged_count"] == 5
    text = " ".join(report["reasons"])
    assert "5 of " in text and "group 'fc1' neurons 2, 9, 17, 40, 63" in text
    assert report["watermark"]["detected"]


def test_untouched_permuted_copy_flags_nothing(wm, spec) -> None:  # type: ignore[no-untyped-def]
    ref, key, null = wm
    report = run(ref, attacks.permute(ref, spec, seed=3).state_dict, spec, None, null)
    assert report["verdict"] == "match"
    assert flagged(report) == set()
    assert report["watermark"] is None
    assert any("no watermark key" in r for r in report["reasons"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_models_from_other_seeds_are_no_match(wm, spec, seed: int) -> None:  # type: ignore[no-untyped-def]
    ref, key, null = wm
    _, other = train.trained("mnist_cnn", seed)
    report = run(ref, attacks.permute(other, spec, seed=seed).state_dict, spec, key, null)
    assert report["verdict"] == "no_match", report["reasons"]
    sim = report["resync"]["similarity"]
    assert sim["mean_margin"] < sim["required"] and not sim["similar"]
    assert not report["watermark"]["detected"]
    assert report["watermark"]["p_value"] > 1e-6


def test_function_preserving_rescale_is_not_a_modification(wm, spec) -> None:  # type: ignore[no-untyped-def]
    ref, key, null = wm
    g = torch.Generator().manual_seed(7)
    sus = dict(ref)
    for grp in spec.groups:  # every neuron of every group: own weights x c, consumers x 1/c
        # factors up to e^5 around the key layer reweight its embedded vector W.mean(0)
        spread = 5.0 if grp.name in ("conv1", "conv2") else 1.0
        c = torch.exp(torch.empty(grp.size).uniform_(-spread, spread, generator=g))
        for m in grp.members:
            t = sus[m.tensor]
            shape = [1] * t.dim()
            shape[m.axis] = -1
            f = c.repeat_interleave(m.block).view(shape)
            sus[m.tensor] = t * f if m.is_out else t / f
    sus = attacks.permute(sus, spec, seed=4).state_dict
    report = run(ref, sus, spec, key, null)
    assert report["verdict"] == "match"
    integ = report["integrity"]
    assert integ["status"] == "intact" and integ["flagged_count"] == 0
    assert integ["rescaled_count"] > 100
    assert report["watermark"]["bit_errors"] == 0 and report["watermark"]["detected"]
    assert any("rescaled without changing the function" in r for r in report["reasons"])
    # without undoing the rescale the re-synchronized weights read a damaged mark
    from findlady_core.resync import resync

    assert detect(resync(ref, sus, spec, device="cpu").state_dict, key)["bit_errors"] > 0


def test_watermark_missing_from_a_matching_model(wm, spec, trained_mnist_cnn) -> None:  # type: ignore[no-untyped-def]
    """The same seed and data order trained without the key: the weights match, the mark is absent."""
    ref, key, null = wm
    report = run(ref, attacks.permute(trained_mnist_cnn[1], spec, seed=6).state_dict, spec, key, null)
    assert report["resync"]["similarity"]["similar"]
    assert not report["watermark"]["detected"]
    assert report["verdict"] == "match_modified"
    assert any("watermark is missing or damaged" in r for r in report["reasons"])


@pytest.mark.parametrize(
    "similar, detected, integrity, verdict",
    [
        (True, True, "intact", "match"),
        (True, None, "intact", "match"),
        (True, True, "modified", "match_modified"),
        (True, None, "modified", "match_modified"),
        (True, False, "intact", "match_modified"),
        (True, False, "modified", "match_modified"),
        (False, True, "intact", "inconclusive"),
        (False, True, "modified", "inconclusive"),
        (False, False, "intact", "no_match"),
        (False, None, "modified", "no_match"),
    ],
)
def test_decision_table(similar: bool, detected: bool | None, integrity: str, verdict: str) -> None:
    assert decide(similar, detected, integrity) == verdict


def test_similarity_needs_the_threshold_above_the_null(wm, spec) -> None:  # type: ignore[no-untyped-def]
    ref, key, null = wm
    sus = attacks.permute(ref, spec, seed=1).state_dict
    margin = run(ref, sus, spec, None, null)["resync"]["similarity"]["mean_margin"]
    assert margin > SIMILARITY_THRESHOLD
    # a null as high as the suspect's own margin makes the same suspect "not similar"
    report = verify(ref, sus, spec, device="cpu", null_margin=margin)
    assert report["verdict"] == "no_match"
    assert report["resync"]["similarity"]["required"] == pytest.approx(margin + SIMILARITY_THRESHOLD)


def test_bad_input_is_refused(wm, spec) -> None:  # type: ignore[no-untyped-def]
    ref, key, null = wm
    bad = dict(ref)
    bad["fc1.weight"] = ref["fc1.weight"][:32]
    with pytest.raises(InputError, match="fc1.weight"):
        verify(ref, bad, spec, device="cpu", null_margin=null)
    nan = dict(ref)
    nan["fc2.bias"] = torch.full_like(ref["fc2.bias"], float("nan"))
    with pytest.raises(WeightsError, match="fc2.bias"):
        verify(ref, nan, spec, device="cpu", null_margin=null)
    with pytest.raises(InputError, match="alpha"):
        verify(ref, ref, spec, alpha=2.0, device="cpu", null_margin=null)
    with pytest.raises(KeyFileError):
        verify(ref, ref, spec, key=generate_key("fc1.weight", (64, 10), bits=8, seed=0), device="cpu", null_margin=null)
