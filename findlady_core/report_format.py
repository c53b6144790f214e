"""The shape of the report document, format 2 (``findlady.report/2``), and its JSON Schema.

``findlady_core.report.verify`` computes the evidence; ``assemble`` lays it out so a third
party can check it: one per-group list (``resync.groups``: re-synchronization and integrity
side by side), a full count beside every truncated list, both models' sha256, the spec's hash,
every threshold, the software version and the time. The schema
(``findlady_core/schemas/report-2.json``, draft 2020-12) describes exactly this document.

``canonical_json`` is the one byte form a report is hashed and signed over.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

FORMAT = "findlady.report/2"
SCHEMA_ID = "https://findlady.invalid/schemas/report-2.json"
KINDS = ("residual", "mlp", "heads", "dims", "conv", "dense")
"""``kind`` of a group: the residual stream, a transformer MLP, attention heads, dims inside one
head, convolution channels, or the hidden neurons of a plain dense layer."""


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the bytes a report is signed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def spec_sha256(spec_dict: Mapping[str, Any]) -> str:
    """sha256 of the spec's canonical JSON: names the exact spec a report was computed with."""
    return hashlib.sha256(canonical_json(dict(spec_dict))).hexdigest()


def group_kind(name: str, out_dims: list[int]) -> str:
    """What a group is, from its name (the catalog's and the tracer's naming) and the number of
    dimensions of its own tensors (4-D or 3-D weights are convolution channels)."""
    last = name.rsplit(".", 1)[-1].lower()
    lower = name.lower()
    if "residual" in lower or last in ("hidden", "embeddings", "stream"):
        return "residual"
    if last in ("heads", "kv_heads") or last.endswith("heads"):
        return "heads"
    if last in ("qk", "vo", "dims") or last.endswith("_dims"):
        return "dims"
    if "mlp" in lower or "intermediate" in lower or "ffn" in lower or "feed_forward" in lower:
        return "mlp"
    if any(d >= 3 for d in out_dims):
        return "conv"
    return "dense"


def software() -> dict[str, str]:
    from findlady_core import __version__
    from findlady_core.resync import SOLVER_VERSION

    return {"name": "findlady", "version": __version__, "solver_version": str(SOLVER_VERSION)}


def _group_entry(g: Mapping[str, Any], kind: str, mean_margin: float | None,
                 integ: Mapping[str, Any] | None) -> dict[str, Any]:
    out = {
        "name": g["name"], "kind": kind, "size": g["size"], "moved": g["moved"],
        "mean_similarity": g["mean_similarity"], "min_margin": g["min_margin"], "mean_margin": mean_margin,
        "ambiguous": g["ambiguous"], "log10_p_value": g["log10_p_value"],
    }
    if integ is not None:
        out["integrity"] = {k: integ[k] for k in ("flagged", "rescaled", "max_abs_log_norm_ratio", "min_cosine")}
    out["permutation"] = g["permutation"]
    return out


def assemble(
    *,
    verdict: str,
    reasons: list[str],
    reference: dict[str, Any],
    suspect: dict[str, Any],
    spec: Any,
    shapes: Mapping[str, Any],
    resync_block: dict[str, Any],
    similarity: dict[str, Any],
    integrity_block: dict[str, Any],
    watermark: dict[str, Any] | None,
    timings: dict[str, float],
    thresholds: dict[str, Any],
) -> dict[str, Any]:
    """The format-2 document from the blocks ``verify`` computed (format 1's blocks, re-laid)."""
    integ_groups: dict[str, Any] = dict(integrity_block.get("groups") or {})
    per_group_margin = similarity.get("groups") or {}
    groups = []
    for g in resync_block["groups"]:
        spec_group = spec.group(g["name"])
        dims = [len(shapes[m.tensor]) for m in spec_group.out_members if m.tensor in shapes]
        groups.append(_group_entry(g, group_kind(g["name"], dims), per_group_margin.get(g["name"]),
                                   integ_groups.get(g["name"])))
    resync_out = {k: v for k, v in resync_block.items() if k != "groups"}
    resync_out["groups"] = groups
    resync_out["groups_count"] = len(groups)
    resync_out["similarity"] = {k: v for k, v in similarity.items() if k != "groups"}

    unpermuted = [
        {"name": name, "neurons": integ_groups[name]["neurons"], "flagged": integ_groups[name]["flagged"],
         "max_abs_log_norm_ratio": integ_groups[name]["max_abs_log_norm_ratio"],
         "min_cosine": integ_groups[name]["min_cosine"]}
        for name in integrity_block.get("unpermuted_layers") or [] if name in integ_groups
    ]
    integrity_out = {k: v for k, v in integrity_block.items() if k not in ("groups", "unpermuted_layers")}
    integrity_out["unpermuted_layers"] = unpermuted
    integrity_out["unpermuted_layers_count"] = len(unpermuted)
    spec_dict = spec.to_dict()
    return {
        "format": FORMAT,
        "verdict": verdict,
        "reasons": reasons,
        "reference": reference,
        "suspect": suspect,
        "spec": {"sha256": spec_sha256(spec_dict), "groups": len(spec.groups), "neurons": spec.neurons},
        "resync": resync_out,
        "integrity": integrity_out,
        "watermark": watermark,
        "timings": timings,
        "thresholds": thresholds,
        "software": software(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def without_permutations(report: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` whose groups carry no ``permutation`` (the REST default: they are
    most of a large model's report and only the owner's tooling needs them)."""
    out = dict(report)
    rs = out.get("resync")
    if isinstance(rs, Mapping) and isinstance(rs.get("groups"), list):
        rs = dict(rs)
        rs["groups"] = [{k: v for k, v in g.items() if k != "permutation"} if isinstance(g, Mapping) else g
                        for g in rs["groups"]]
        out["resync"] = rs
    return out


@cache
def _schema_text() -> str:
    return resources.files("findlady_core").joinpath("schemas/report-2.json").read_text(encoding="utf-8")


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a format-2 report (a fresh copy each call)."""
    return json.loads(_schema_text())
