"""The dashboard's pictures as data (``findlady_core.visuals``): similarity matrices before and
after re-synchronization, margins, integrity counts, watermark bits."""

from __future__ import annotations

import pytest
import torch

from findlady_core import attacks, visuals
from findlady_core.integrity import check_integrity
from findlady_core.report import reference_null, verify
from findlady_core.resync import resync
from findlady_core.spec import Spec


def mlp(seed: int, sizes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        sd[f"fc{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        sd[f"fc{i}.bias"] = torch.randn(b, generator=g) * 0.1
    return sd


def mlp_spec(sizes: tuple[int, ...]) -> Spec:
    groups = [{"name": f"fc{i}", "size": sizes[i], "members": [
        {"tensor": f"fc{i}.weight", "axis": 0}, {"tensor": f"fc{i}.bias", "axis": 0},
        {"tensor": f"fc{i + 1}.weight", "axis": 1}]} for i in range(1, len(sizes) - 1)]
    return Spec.from_dict({"format": "findlady.spec/1", "groups": groups})


@pytest.fixture(scope="module")
def cnn_doc(watermarked_mnist_cnn, mnist_cnn_spec):  # type: ignore[no-untyped-def]
    """The report and the visuals of a permuted copy of the watermarked CNN, from one verify."""
    _, ref, key = watermarked_mnist_cnn
    attacked = attacks.permute(ref, mnist_cnn_spec, seed=1)
    docs = []
    report = verify(ref, attacked.state_dict, mnist_cnn_spec, key=key, device="cpu", null_margin=0.0,
                    evidence=lambda r, i: docs.append(visuals.build(r, i, key=key, suspect=attacked.state_dict)))
    return report, docs[0], attacked.truth, key


def test_after_shows_the_diagonal_and_before_the_suspects_order(cnn_doc) -> None:  # type: ignore[no-untyped-def]
    report, doc, truth, _ = cnn_doc
    assert report["verdict"] == "match"
    for g in doc["groups"]:
        m = doc["matrices"][g["name"]]
        n = g["size"]
        assert m["indices"] == list(range(n))  # small groups are shown whole
        after, before = torch.tensor(m["after"]), torch.tensor(m["before"])
        assert after.shape == before.shape == (n, n)
        # an unmodified permuted copy: each reference neuron's match is itself, similarity 1
        assert torch.allclose(after.diagonal(), torch.ones(n), atol=2e-3)
        assert torch.equal(after.argmax(1), torch.arange(n))
        # before: reference neuron i finds its match where the attack put it
        p = torch.as_tensor(truth[g["name"]])
        assert torch.equal(before[torch.arange(n), p], after.diagonal())
        assert not torch.equal(before, after)  # the attack moved neurons
        assert sum(g["margin_counts"]) == n
    assert sum(doc["margins"]["counts"]) == doc["margins"]["neurons"] == sum(g["size"] for g in doc["groups"])


def test_bits_scrambled_before_and_read_after(cnn_doc) -> None:  # type: ignore[no-untyped-def]
    report, doc, _, key = cnn_doc
    wm = doc["watermark"]
    assert wm["layer"] == key.layer and len(wm["key"]) == len(wm["before"]) == len(wm["after"]) == 64
    errors = lambda s: sum(a != b for a, b in zip(s, wm["key"], strict=True))  # noqa: E731
    assert errors(wm["after"]) == report["watermark"]["bit_errors"] == 0
    assert errors(wm["before"]) == report["watermark"]["bit_errors_before_resync"] > 8
    units = {u["name"]: u for u in doc["integrity"]["units"]}
    assert {g["name"] for g in doc["groups"]} <= set(units)
    assert all(u["flagged"] == 0 for u in units.values()) and doc["integrity"]["status"] == "intact"


def test_the_report_is_the_same_with_or_without_the_pictures(cnn_doc, watermarked_mnist_cnn, mnist_cnn_spec) -> None:  # type: ignore[no-untyped-def]
    report, _, _, key = cnn_doc
    _, ref, _ = watermarked_mnist_cnn
    plain = verify(ref, attacks.permute(ref, mnist_cnn_spec, seed=1).state_dict, mnist_cnn_spec, key=key,
                   device="cpu", null_margin=0.0)
    assert untimed(plain) == untimed(report)


def untimed(value):  # type: ignore[no-untyped-def]
    """The report without its clock readings (``timings``, ``seconds``, ``created_at``)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("timings", "seconds", "created_at")}
    return value


def test_large_groups_are_downsampled_on_the_same_indices() -> None:
    sizes = (8, 300, 20, 4)
    spec = mlp_spec(sizes)
    ref = mlp(0, sizes)
    attacked = attacks.permute(ref, spec, seed=2)
    noisy = attacks.gaussian_noise(attacked.state_dict, 0.5, targets=attacks.attack_targets(attacked.state_dict), seed=3)
    r = resync(ref, noisy, spec, device="cpu", keep_similarities=True)
    integ = check_integrity(ref, r.state_dict, spec)
    small = visuals.build(r, integ)
    full = visuals.build(r, integ, max_side=1000)
    m, f = small["matrices"]["fc1"], full["matrices"]["fc1"]
    idx = torch.tensor(m["indices"])
    assert len(idx) == visuals.MAX_SIDE and idx[0] == 0 and idx[-1] == 299 and bool((idx.diff() > 0).all())
    assert torch.equal(torch.tensor(m["after"]), torch.tensor(f["after"])[idx][:, idx])
    assert torch.equal(torch.tensor(m["before"]), torch.tensor(f["before"])[idx][:, idx])
    assert small["watermark"] is None
    # noise flags neurons: the counts are the integrity check's
    units = {u["name"]: u for u in small["integrity"]["units"]}
    assert units["fc1"]["flagged"] == integ.groups["fc1"]["flagged"] > 0


def test_one_group_per_view() -> None:
    sizes = (6, 12, 10, 3)
    spec = mlp_spec(sizes)
    ref = mlp(0, sizes)
    r = resync(ref, attacks.permute(ref, spec, seed=4).state_dict, spec, device="cpu", keep_similarities=True)
    doc = visuals.build(r, check_integrity(ref, r.state_dict, spec))
    v = visuals.view(doc)
    assert v["group"] == "fc1" and "matrices" not in v and len(v["matrix"]["after"]) == 12  # the largest group
    assert visuals.view(doc, "fc2")["matrix"]["size"] == 10
    with pytest.raises(KeyError):
        visuals.view(doc, "nope")


def test_unrelated_model_shows_no_diagonal(mnist_cnn_spec, trained_mnist_cnn) -> None:  # type: ignore[no-untyped-def]
    from findlady_examples import train

    _, ref = trained_mnist_cnn
    _, other = train.trained("mnist_cnn", 1)
    null = reference_null(ref, mnist_cnn_spec, device="cpu")
    docs = []
    report = verify(ref, other, mnist_cnn_spec, device="cpu", null_margin=null,
                    evidence=lambda r, i: docs.append(visuals.build(r, i)))
    assert report["verdict"] == "no_match"
    after = torch.tensor(docs[0]["matrices"]["fc1"]["after"])
    assert float(after.diagonal().mean()) < 0.5  # no bright diagonal for another model


def test_matrices_are_strict_json_as_built():
    """A service stores the matrices without walking them: non-finite values are None already."""
    import json

    from findlady_core.visuals import _rounded

    rows = _rounded(torch.tensor([[0.12345, float("nan")], [float("inf"), -1.0]]))
    assert rows == [[0.123, None], [None, -1.0]]
    json.dumps(rows, allow_nan=False)
    assert _rounded(torch.tensor([[0.5, 0.25]])) == [[0.5, 0.25]]
