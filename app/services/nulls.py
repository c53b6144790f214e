"""A reference's null margin, computed once and stored with the reference.

The null (``findlady_core.null.reference_null``: the reference re-synchronized against
structureless tensors drawn from its own values when read) depends on the reference, its spec and its key alone, so it is paid at
registration, not by every job. It is stored with the solver version that computed it: a job
against a reference whose null came from another solver version (or from before the column
existed) recomputes it and stores it, so each version pays it once per reference.

Nulls stored before the null drew its tensors lazily (from a shuffle of the whole model) are the
same statistic from another random draw and stay valid: over 12 draws of each kind on the
bundled models the two agree within their draw-to-draw spread (docs/verdict.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from app.models import Reference
from app.runtime import Runtime

if TYPE_CHECKING:
    import torch


def solver_version() -> str:
    from findlady_core.resync import SOLVER_VERSION

    return str(SOLVER_VERSION)


def reference_null_margin(reference: Mapping[str, torch.Tensor], spec: Any, key: Any, *, device: str,
                          progress: Any = None) -> float:
    """The null ``report.verify`` would compute, with the key's watermark inputs ignored as it does.

    A reference without groups of two or more neurons has no null (NaN); ``verify`` counts
    that as 0, and so does the stored value, which must be a finite number.
    """
    from findlady_core.report import reference_null, watermark_inputs

    value = reference_null(reference, spec, device=device, ignore=watermark_inputs(key, reference), progress=progress)
    return float(value) if math.isfinite(value) else 0.0


def null_is_current(ref: Reference) -> bool:
    return ref.null_margin is not None and ref.null_solver_version == solver_version()


def store_null(runtime: Runtime, reference_id: str, value: float) -> None:
    with runtime.sessions() as session:
        session.execute(update(Reference).where(Reference.id == reference_id)
                        .values(null_margin=value, null_solver_version=solver_version()))
        session.commit()
