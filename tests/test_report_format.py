"""Report format 2 (``findlady_core.report_format``) against its published JSON Schema.

Reports from several setups (with and without a key, modified, unrelated) must validate; a
report with an unknown verdict, a wrong type or a missing field must not. (Every other report
the suite builds in-process is validated as it is assembled: ``conftest.py``.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from findlady_core import attacks
from findlady_core.report import verify
from findlady_core.report_format import FORMAT, canonical_json, group_kind, spec_sha256, without_permutations
from findlady_core.spec import Spec
from findlady_core.watermark import generate_key
from report_schema import assert_valid, errors

SIZES = (8, 48, 32, 4)


def mlp(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True), start=1):
        sd[f"fc{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        sd[f"fc{i}.bias"] = torch.randn(b, generator=g) * 0.1
    return sd


SPEC = Spec.from_dict({"format": "findlady.spec/1", "groups": [
    {"name": f"fc{i}", "size": SIZES[i], "members": [
        {"tensor": f"fc{i}.weight", "axis": 0}, {"tensor": f"fc{i}.bias", "axis": 0},
        {"tensor": f"fc{i + 1}.weight", "axis": 1}]} for i in (1, 2)]})


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    ref = mlp(0)
    key = generate_key("fc2.weight", (SIZES[2], SIZES[1]), bits=40, seed=5)
    permuted = attacks.permute(ref, SPEC, seed=3)
    modified = {k: v.clone() for k, v in permuted.state_dict.items()}
    modified["fc1.weight"][:20] *= 1.5  # 20 neurons off by 50%
    run = lambda sus, k=None: verify(ref, sus, SPEC, key=k, device="cpu", null_margin=0.0)  # noqa: E731
    return {
        "match": run(permuted.state_dict), "with_key": run(permuted.state_dict, key),
        "modified": run(modified), "no_match": run(mlp(1)), "no_match_key": run(mlp(1), key),
    }


def test_every_setup_validates(reports: dict[str, dict]) -> None:
    verdicts = {name: r["verdict"] for name, r in reports.items()}
    assert verdicts == {"match": "match", "with_key": "match_modified", "modified": "match_modified",
                        "no_match": "no_match", "no_match_key": "no_match"}
    for r in reports.values():
        assert r["format"] == FORMAT == "findlady.report/2"
        assert_valid(r)
        assert_valid(without_permutations(r))  # the REST default


def test_one_per_group_list_with_integrity_counts(reports: dict[str, dict]) -> None:
    r = reports["modified"]
    groups = {g["name"]: g for g in r["resync"]["groups"]}
    assert list(groups) == ["fc1", "fc2"] and r["resync"]["groups_count"] == 2
    assert groups["fc1"]["kind"] == "dense" and groups["fc1"]["size"] == 48
    assert groups["fc1"]["integrity"]["flagged"] == 20 and groups["fc2"]["integrity"]["flagged"] == 0
    assert r["integrity"]["flagged_count"] == 20 == len(r["integrity"]["flagged"])
    assert "groups" not in r["integrity"] and "groups" not in r["resync"]["similarity"]
    assert [u["name"] for u in r["integrity"]["unpermuted_layers"]] == ["fc3"]
    assert r["integrity"]["unpermuted_layers_count"] == 1
    # the suspect's recovered permutations are the truth (CLI --json keeps them)
    assert sorted(groups["fc1"]["permutation"]) == list(range(48))


def test_third_party_fields(reports: dict[str, dict]) -> None:
    r = reports["with_key"]
    assert r["spec"] == {"sha256": spec_sha256(SPEC.to_dict()), "groups": 2, "neurons": 80}
    assert len(r["reference"]["sha256"]) == 64 and len(r["suspect"]["sha256"]) == 64
    assert r["reference"]["sha256"] != r["suspect"]["sha256"]
    assert r["software"]["name"] == "findlady" and r["software"]["version"]
    assert r["thresholds"]["watermark_alpha"] == 1e-6 and r["created_at"].endswith("Z")
    assert r["watermark"]["bits"] == 40 and "bit_errors_before_resync" in r["watermark"]


def test_truncated_list_keeps_its_full_count() -> None:
    ref = mlp(0)
    sus = {k: v.clone() for k, v in ref.items()}
    sus["fc1.weight"] *= 1.5
    sus["fc2.weight"] *= 1.5
    sus["fc3.weight"] *= 1.5
    r = verify(ref, sus, SPEC, device="cpu", null_margin=0.0)
    assert r["integrity"]["flagged_count"] == 48 + 32 + 4
    assert len(r["integrity"]["flagged"]) <= r["integrity"]["flagged_count"]
    assert_valid(r)


def test_schema_rejects_bad_reports(reports: dict[str, dict]) -> None:
    good = reports["with_key"]
    bad = copy.deepcopy(good)
    bad["verdict"] = "probably_stolen"
    assert any(e.startswith("verdict:") for e in errors(bad))
    for mutate, where in [
        (lambda d: d.pop("spec"), "(root)"),
        (lambda d: d["resync"]["groups"][0].__setitem__("kind", "mystery"), "resync/groups/0/kind"),
        (lambda d: d["integrity"].__setitem__("flagged_count", "many"), "integrity/flagged_count"),
        (lambda d: d["watermark"].pop("bit_errors"), "watermark"),
        (lambda d: d["suspect"].__setitem__("sha256", "xyz"), "suspect/sha256"),
        (lambda d: d.__setitem__("format", "findlady.report/1"), "format"),
    ]:
        bad = copy.deepcopy(good)
        mutate(bad)
        assert any(e.startswith(where) for e in errors(bad)), where


def test_group_kinds() -> None:
    assert group_kind("residual", [2, 2]) == "residual"
    assert group_kind("encoder.layer.0.mlp", [2]) == "mlp"
    assert group_kind("encoder.layer.0.attention.heads", [2]) == "heads"
    assert group_kind("encoder.layer.0.attention.head3.qk", [2]) == "dims"
    assert group_kind("conv1", [4, 1]) == "conv"
    assert group_kind("fc1", [2, 1]) == "dense"


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": "é", "c": [1.5, None]}) == '{"a":"é","b":1,"c":[1.5,null]}'.encode()
