"""The verification report (``findlady.report/2``, laid out by ``findlady_core.report_format``) and its verdict.

``verify`` re-synchronizes the suspect, decides whether it is the reference at all
(similarity), checks every neuron's integrity, reads the watermark before and after
re-synchronization, and returns one JSON-ready dict with the verdict and plain reasons.

Decision rule (also in docs/verdict.md, with the calibration behind it):

1. **Similar?** For every neuron of every permuted group (of two or more neurons) the
   *margin* is its matched similarity minus its best alternative (the best other suspect
   neuron for it, or the best other reference neuron for its match). The statistic is the
   neuron-weighted mean margin. Models of the same architecture trained from other seeds sit
   below 0 (shared structure makes some suspect neurons the best match of many reference
   neurons, so the assignment's picks lose to runners-up), structureless suspects near 0,
   while permuted and perturbed copies sit clearly above. The solver's own optimism on
   structureless weights depends on the architecture (up to about +0.017 on the bundled
   VGG), so it is measured for each reference, by re-synchronizing the reference against a
   structureless model drawn from its own values (``reference_null``, ``findlady_core.null``), and the suspect is similar when its mean
   margin is at least ``SIMILARITY_THRESHOLD`` above that null *and* at least
   ``SIMILARITY_THRESHOLD`` in absolute terms. The calibration script ``calibrate_null`` measures both
   sides; the per-neuron p-value of ``resync`` assumes independent neurons and is reported for
   information only, never used to decide.
2. **Watermark** (when a key is given): detected when ``P[Binomial(T, 1/2) <= errors] < alpha``,
   read from the re-synchronized suspect with function-preserving rescales undone.
3. **Integrity**: ``findlady_core.integrity``; ``modified`` when any neuron's norm is off by more
   than the tolerance (default 1%) or its cosine is below ``1 - tolerance**2 / 2``.

| similar | watermark | integrity | verdict |
|---|---|---|---|
| yes | detected, or no key | intact | match |
| yes | detected, or no key | modified | match_modified |
| yes | not detected | any | match_modified (watermark removed or damaged) |
| no | detected | any | inconclusive |
| no | not detected, or no key | any | no_match |
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from findlady_core.errors import InputError, WeightsError
from findlady_core.compat import check_compatible
from findlady_core.integrity import DEFAULT_TOLERANCE, IntegrityResult, check_integrity
from findlady_core.report_format import FORMAT, assemble  # noqa: F401  (FORMAT: re-exported)
from findlady_core.null import NULL_SEED, reference_null  # noqa: F401  (re-exported)
from findlady_core.progress import Progress, as_callback, tick
from findlady_core.canon.pipeline import canonical_resync, for_reading, scale_transforms
from findlady_core.canon.reasons import transform_reasons
from findlady_core.resync import AMBIGUOUS_MARGIN, ResyncResult, margins
from findlady_core.rotation.estimate import stream_group
from findlady_core.spec import Spec

VERDICTS = ("match", "match_modified", "no_match", "inconclusive")
DEFAULT_ALPHA = 1e-6
SIMILARITY_THRESHOLD = 0.03
"""Mean margin needed, above 0 and above the reference's shuffled null (docs/verdict.md)."""
SIMILARITY_STATISTIC = "mean_margin"
MAX_LISTED = 10  # neurons named per group in a reason sentence


# ---------------------------------------------------------------------------------------------
# similarity evidence


def neuron_margins(similarity: torch.Tensor) -> torch.Tensor:
    """Per reference neuron: ``resync.margins`` (matched similarity minus the best alternative)
    under the maximum-similarity bijection of ``similarity`` (rows: reference, columns: suspect)."""
    s = similarity.detach().cpu().double()
    n = s.shape[0]
    if n < 2:
        raise ValueError("a margin needs at least two neurons")
    rows, cols = linear_sum_assignment(s.numpy(), maximize=True)
    p = torch.empty(n, dtype=torch.int64)
    p[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return margins(s, p)


def mean_margins(result: ResyncResult) -> tuple[float, int, dict[str, float]]:
    """Neuron-weighted mean margin over the groups of two or more neurons, the neuron count,
    and the mean per group. Uses the margins of each group's last solve (its bijection is the
    maximum-similarity one, so they are ``neuron_margins`` of its matrix): no N x N matrix has
    to be kept, nor any assignment solved again; kept similarities are the fallback."""
    per_group: dict[str, float] = {}
    total = 0.0
    count = 0
    for g in result.groups:
        if g.size < 2:
            continue
        if g.margins is not None and result.method == "findlady":  # (the paper's argmax is no bijection)
            m = g.margins.double()
        else:
            s = result.similarities.get(g.name)
            if s is None:
                raise ValueError(f"resync result lacks the margins of group {g.name!r}")
            m = neuron_margins(s)
        per_group[g.name] = float(m.mean())
        total += float(m.sum())
        count += g.size
    return (total / count if count else float("nan")), count, per_group


def shuffled(state_dict: Mapping[str, torch.Tensor], seed: int = NULL_SEED) -> dict[str, torch.Tensor]:
    """Every floating tensor's entries in a random order: the same values without structure
    (a structureless suspect for tests and the calibration; the null itself draws its
    structureless tensors lazily, ``findlady_core.null``)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v.flatten()[torch.randperm(v.numel(), generator=g)].view_as(v) if v.is_floating_point() else v
        for k, v in state_dict.items()
    }


def watermark_inputs(key: Any, reference: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """The watermarked layer's input axes, which re-synchronization must not use as evidence.

    The key reads ``W.mean(0)``: aligning the previous layer's neurons on ``W``'s columns would
    choose, for an unrelated model, the order that looks most like the reference there and bias
    its bits towards the key (measured: 16-24 errors of 64 instead of about 32).
    """
    if key is None:
        return []
    return [(key.layer, a) for a in range(1, reference[key.layer].dim())]


def similarity_evidence(
    result: ResyncResult, null_margin: float = 0.0, threshold: float = SIMILARITY_THRESHOLD
) -> dict[str, Any]:
    """The calibrated similarity decision for a re-synchronization: similar when the mean
    margin reaches ``max(threshold, null_margin + threshold)``."""
    value, count, per_group = mean_margins(result)
    if not math.isfinite(null_margin):
        null_margin = 0.0  # a reference without groups of two neurons has no null to speak of
    required = max(threshold, null_margin + threshold)
    return {
        "statistic": SIMILARITY_STATISTIC,
        "mean_margin": value if count else None,
        "null_mean_margin": null_margin,
        "threshold": threshold,
        "required": required,
        "neurons": count,
        "similar": bool(count and value >= required),
        "groups": per_group,
    }


# ---------------------------------------------------------------------------------------------
# the decision


def decide(similar: bool, watermark_detected: bool | None, integrity_status: str) -> str:
    """The verdict table of this module's docstring. ``watermark_detected`` is None without a key."""
    if integrity_status not in ("intact", "modified"):
        raise ValueError(f"integrity status must be intact or modified, got {integrity_status!r}")
    if similar:
        if watermark_detected is False:
            return "match_modified"  # the weights are the reference's but the mark is gone or damaged
        return "match" if integrity_status == "intact" else "match_modified"
    return "inconclusive" if watermark_detected else "no_match"


def _p(p: float, log10_p: float) -> str:
    """A p-value for a sentence; below float range it is written from its log10."""
    if p > 0:
        return f"{p:.2g}"
    exp = math.floor(log10_p)
    return f"{10 ** (log10_p - exp):.2g}e{exp}"


def _neuron_list(rows: list[dict[str, Any]], key: str) -> str:
    shown = rows[:MAX_LISTED]
    idx = ", ".join(str(r["neuron"]) for r in shown)
    vals = sorted({f"x{r[key]:.3g}" for r in shown})
    vals_text = ", ".join(vals[:3]) + (", ..." if len(vals) > 3 else "")
    more = f" and {len(rows) - len(shown)} more" if len(rows) > len(shown) else ""
    return f"neurons {idx}{more} ({vals_text})"


def _by_group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["group"], []).append(r)
    for lst in out.values():
        lst.sort(key=lambda r: r["neuron"])
    return out


def _integrity_reasons(integ: IntegrityResult) -> list[str]:
    pct = f"{100 * integ.tolerance:.3g}%"
    reasons = []
    if integ.rescaled:
        groups = _by_group(integ.rescaled)
        parts = [f"group '{g}' {_neuron_list(rows, 'factor')}" for g, rows in groups.items()]
        reasons.append(
            f"{len(integ.rescaled):,} neurons were rescaled without changing the function (own weights x c, "
            f"consumers' weights x 1/c); undone before the checks: " + "; ".join(parts[:5])
            + ("; ..." if len(parts) > 5 else "")
        )
    if not integ.flagged:
        reasons.append(
            f"all {integ.neurons:,} neurons are intact: norms within {pct} of the reference "
            f"(largest deviation {100 * math.expm1(integ.max_abs_log_norm_ratio):.2g}%), cosines at least {1 - integ.cos_tolerance:.6g}"
        )
        return reasons
    groups = _by_group(integ.flagged)
    in_norm = sum(1 for r in integ.flagged if abs(math.log(max(r["norm_ratio"], 1e-300))) > integ.tolerance)
    in_stats = sum(1 for r in integ.flagged if "statistics_norm_ratio" in r)
    kinds = [f"{in_norm:,} in norm", f"{len(integ.flagged) - in_norm:,} in direction only"]
    if in_stats:
        kinds.append(f"{in_stats:,} in running statistics")
    head = (
        f"{len(integ.flagged):,} of {integ.neurons:,} neurons differ from the reference beyond the {pct} tolerance "
        f"({', '.join(kinds)}; lowest cosine {integ.min_cosine:.6g})"
    )
    parts = []
    for g, rows in groups.items():
        size = integ.groups[g]["neurons"]
        if len(rows) <= MAX_LISTED and len(rows) < size:
            parts.append(f"group '{g}' {_neuron_list(rows, 'norm_ratio')}")
        else:
            parts.append(f"group '{g}' {len(rows)}/{size}")
    reasons.append(head + ": " + "; ".join(parts[:12]) + ("; ..." if len(parts) > 12 else ""))
    return reasons


def _reasons(
    verdict: str,
    sim: dict[str, Any],
    r: ResyncResult,
    integ: IntegrityResult,
    wm: dict[str, Any] | None,
    wm_before: dict[str, Any] | None,
) -> list[str]:
    reasons = []
    n = sim["neurons"]
    if not n:
        reasons.append("no permuted group has two or more neurons: similarity to the reference cannot be judged")
    elif sim["similar"]:
        reasons.append(
            f"the suspect's neurons match the reference's: mean margin {sim['mean_margin']:.3f} over {n:,} neurons "
            f"(similar from {sim['required']:.3g}; the reference against its own shuffled weights gives "
            f"{sim['null_mean_margin']:.3f}, models trained from other seeds stay below 0); "
            f"{r.moved:,} neurons were out of place and re-synchronized"
        )
    else:
        reasons.append(
            f"the suspect's neurons do not match the reference's: mean margin {sim['mean_margin']:.3f} over {n:,} neurons, "
            f"below the {sim['required']:.3g} needed (the reference against its own shuffled weights gives "
            f"{sim['null_mean_margin']:.3f})"
        )
    if sim["similar"]:
        reasons += transform_reasons(r.transforms)
        reasons += _integrity_reasons(integ)
    if wm is None:
        reasons.append("no watermark key was given: the verdict rests on the weights alone")
    else:
        t = wm["bits"]
        if wm["detected"]:
            reasons.append(f"watermark detected: {wm['bit_errors']}/{t} bit errors, p = {_p(wm['p_value'], wm['log10_p_value'])}")
        else:
            reasons.append(
                f"watermark not detected: {wm['bit_errors']}/{t} bit errors, p = {_p(wm['p_value'], wm['log10_p_value'])} "
                f"(detection needs p < {wm['alpha']:g})"
            )
        if wm_before is not None and wm_before["bit_errors"] != wm["bit_errors"]:
            reasons.append(f"watermark bit errors were {wm_before['bit_errors']}/{t} before re-synchronization")
    if verdict == "match_modified" and sim["similar"] and wm is not None and not wm["detected"]:
        reasons.append("the weights are the reference's but its watermark is missing or damaged")
    if verdict == "inconclusive":
        reasons.append("the watermark reads although the weights do not match the reference: check by hand")
    return reasons


# ---------------------------------------------------------------------------------------------
# verify


def _check_finite(state_dict: Mapping[str, torch.Tensor], which: str) -> None:
    for name, t in state_dict.items():
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)  # NaN and Inf reach the extremes; 25x faster than isfinite().all()
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                raise WeightsError(f"{which} tensor {name!r} holds NaN or Inf")


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InputError(f"alpha must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def _info(info: Mapping[str, Any] | None, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    out = dict(info or {})
    if not out.get("sha256"):
        from findlady_core.io import state_dict_sha256

        out["sha256"] = state_dict_sha256(state_dict)
        out["sha256_of"] = "tensors"
    return out


def verify(
    reference: Mapping[str, torch.Tensor],
    suspect: Mapping[str, torch.Tensor],
    spec: Spec,
    *,
    key: Any = None,
    device: str = "auto",
    alpha: float = DEFAULT_ALPHA,
    tolerance: float = DEFAULT_TOLERANCE,
    reference_info: dict[str, Any] | None = None,
    suspect_info: dict[str, Any] | None = None,
    progress: bool | Progress | None = None,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
    null_margin: float | None = None,
    load_seconds: float = 0.0,
    on_resynced: Callable[[dict[str, torch.Tensor]], None] | None = None,
    evidence: Callable[[ResyncResult, IntegrityResult], None] | None = None,
    rotation: Any = None,
) -> dict[str, Any]:
    """The full ``findlady.report/2`` for ``suspect`` against ``reference``.

    ``rotation`` is a ``findlady_core.rotation.StreamFamily`` (from the model's config) or None:
    with one, a residual-stream rotation of the suspect is estimated, checked on held-out
    weights and undone before re-synchronization when the check passes (listed in
    ``resync.transforms``, kind ``rotation``); when it does not, a reason says so and the
    permutation result stands.

    ``key`` is a ``WatermarkKey`` or None. ``reference_info`` / ``suspect_info`` may carry
    ``id`` and the file ``sha256``; without one the hash is taken over the tensors.
    ``null_margin`` is ``reference_null(reference, spec)``, computed here when not given. Bad input
    (shapes, dtypes, NaN, a key that does not fit) raises an ``InputError`` subclass.
    ``on_resynced``, when given, receives the re-synchronized suspect (reference order), e.g. to
    store it.
    ``evidence`` (e.g. ``findlady_core.visuals.build``) is called with the resync result, its
    similarity matrices still kept, and the integrity result; it does not change the report.
    ``progress`` (``findlady_core.progress``) hears the phases null, resync, integrity, watermark.
    """
    from findlady_core.io import count_parameters
    from findlady_core.watermark import check_key, detect

    alpha = _check_alpha(alpha)
    if isinstance(similarity_threshold, bool) or not isinstance(similarity_threshold, (int, float)):
        raise InputError(f"similarity threshold must be a number, got {similarity_threshold!r}")
    spec.validate(reference)
    given, rotated = suspect, None
    t_rotation = 0.0
    if rotation is not None:  # before the shape check: a rotated copy of a tied model holds its head untied
        from findlady_core.rotation import estimate_rotation

        _check_finite(suspect, "suspect")
        t0 = time.perf_counter()
        rotated = estimate_rotation(reference, suspect, rotation)
        t_rotation = time.perf_counter() - t0
        suspect = rotated.state_dict
    check_compatible(reference, suspect, spec=spec)  # width groups may differ (findlady_core.canon)
    t0 = time.perf_counter()
    _check_finite(reference, "reference")
    t_checks = time.perf_counter() - t0
    if key is not None:
        check_key(key, reference, spec)
    progress = as_callback(progress)
    if null_margin is not None and (
        isinstance(null_margin, bool) or not isinstance(null_margin, (int, float)) or not math.isfinite(null_margin)
    ):
        raise InputError(f"null margin must be a finite number, got {null_margin!r}")

    t_null = 0.0  # a null given by the caller (stored at registration, --null-margin) costs nothing here
    if null_margin is None:
        # before the suspect's values are read: the null's drawn tensors (at most
        # null.CACHE_BYTES of them at a time) are freed by then
        t0 = time.perf_counter()
        null_margin = reference_null(reference, spec, device=device, ignore=watermark_inputs(key, reference),
                                     progress=progress)
        t_null = time.perf_counter() - t0
    t0 = time.perf_counter()
    _check_finite(suspect, "suspect")
    t_checks += time.perf_counter() - t0

    t0 = time.perf_counter()
    wm_before = None
    if key is not None and tuple(given[key.layer].shape) == tuple(reference[key.layer].shape):
        wm_before = detect(given, key, alpha=alpha)  # another width cannot be read before re-synchronization
    t_wm = time.perf_counter() - t0

    ignore = watermark_inputs(key, reference)
    # N x N similarities per group only for the visuals: the margins are kept per group
    t0 = time.perf_counter()
    r = canonical_resync(reference, suspect, spec, device=device, progress=progress, ignore=ignore,
                         keep_similarities=evidence is not None)
    t_resync = t_rotation + time.perf_counter() - t0  # every fit and undo, not only the solver's passes
    sim = similarity_evidence(r, float(null_margin), float(similarity_threshold))
    t_write = t_visuals = 0.0
    if on_resynced is not None:
        t0 = time.perf_counter()
        on_resynced(r.state_dict)
        t_write = time.perf_counter() - t0

    integ = check_integrity(reference, r.state_dict, spec, tolerance=tolerance, progress=progress)
    r.transforms += scale_transforms(integ.rescaled)
    real = [t for t in r.transforms if not t.get("function_preserving", True)]
    if real:  # neurons added or missing beyond what merges and drops explain
        integ.status = "modified"
    if evidence is not None:
        t0 = time.perf_counter()
        evidence(r, integ)
        t_visuals = time.perf_counter() - t0
        r.similarities.clear()

    t0 = time.perf_counter()
    tick(progress, "watermark", 0, 1)
    wm = None
    if key is not None:  # rescales integrity left in place (under noise) undone for the read
        wm = detect(for_reading(reference, integ.state_dict, spec) if integ.status == "modified" else integ.state_dict,
                    key, alpha=alpha)
    tick(progress, "watermark", 1, 1)
    t_wm += time.perf_counter() - t0

    verdict = decide(sim["similar"], None if wm is None else bool(wm["detected"]), integ.status)
    reasons = _reasons(verdict, sim, r, integ, wm, wm_before)
    if rotated is not None:
        reasons.insert(0, rotated.reason())
        if rotated.applied:
            r.transforms.append(rotated.transform(stream_group(spec, rotation)))
    watermark_block = None
    if wm is not None:
        watermark_block = dict(wm)
        watermark_block["layer"] = key.layer
        watermark_block["bit_errors_before_resync"] = None if wm_before is None else wm_before["bit_errors"]
        watermark_block["p_value_before_resync"] = None if wm_before is None else wm_before["p_value"]
        watermark_block["log10_p_value_before_resync"] = None if wm_before is None else wm_before["log10_p_value"]
    ref_info = _info(reference_info, reference)
    sus_info = _info(suspect_info, given)
    sus_info["parameters"] = count_parameters(given)
    return assemble(
        verdict=verdict,
        reasons=reasons,
        reference={"id": ref_info.get("id"), **{k: v for k, v in ref_info.items() if k != "id"}},
        suspect=sus_info,
        spec=spec,
        shapes={k: tuple(v.shape) for k, v in reference.items()},
        resync_block=r.to_dict(),
        similarity=sim,
        integrity_block=integ.to_dict(),
        watermark=watermark_block,
        timings={"load": load_seconds + t_checks, "null": t_null, "resync": t_resync, "integrity": integ.seconds,
                 "watermark": t_wm, "write": t_write, "visuals": t_visuals},
        thresholds={
            "similarity_statistic": SIMILARITY_STATISTIC,
            "similarity_mean_margin": float(similarity_threshold),
            "similarity_required": sim["required"],
            "ambiguous_margin": AMBIGUOUS_MARGIN,
            "integrity_tolerance": integ.tolerance,
            "integrity_cos_tolerance": integ.cos_tolerance,
            "watermark_alpha": alpha,
        },
    )


def verify_files(
    reference_path: str | Path,
    suspect_path: str | Path,
    spec: Spec,
    *,
    key: Any = None,
    reference_id: str | None = None,
    max_bytes: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``verify`` on two weight files (safe loader), with file hashes and the load time."""
    from findlady_core.io import file_sha256, load_state_dict

    t0 = time.perf_counter()
    reference = load_state_dict(reference_path, max_bytes=max_bytes)
    suspect = load_state_dict(suspect_path, max_bytes=max_bytes)
    ref_info = {"id": reference_id, "sha256": file_sha256(reference_path)}
    sus_info = {"sha256": file_sha256(suspect_path)}
    load = time.perf_counter() - t0
    return verify(reference, suspect, spec, key=key, reference_info=ref_info, suspect_info=sus_info,
                  load_seconds=load, **kwargs)
