"""Find a residual-stream rotation, check it on evidence it was not fit on, and undo it.

1. Fold the norms of both models (``fold.py``): their streams are then related by one
   orthogonal ``Q`` (a rotation composed with a permutation is one Q).
2. Fit ``Q`` by orthogonal Procrustes on the tables whose rows the inputs fix (token and
   position embeddings, the output head): ``suspect ~ reference Q^T`` row by row. For
   LayerNorm families the fit is restricted to rotations fixing the ones vector.
3. Check it on the held-out evidence: every other stream-side weight (each layer's
   projections). Their other axis may be permuted (heads, MLP neurons), so each is compared
   through its Gram matrix on the stream axis, which no permutation of that other axis
   changes: the residual of one tensor is ``|C_r - Q^T C_s Q| / sqrt(2)`` with ``C`` the
   Gram minus its mean diagonal, scaled to unit norm (0: same, about 1: unrelated). The
   model's residual is the median over its held-out tensors.
4. Undo it only when that residual is at most ``ROTATION_THRESHOLD``, calibrated on models of
   other seeds (docs/obfuscation.md): the decision never rests on the fitted tables, which a
   free orthogonal fit always matches well. Otherwise the suspect is left as it was and the
   permutation result stands.

An undone suspect is unfolded onto the reference's norm parameters: it is then in the
reference's basis and parameterization, ready for the usual re-synchronization of the other
groups, integrity and watermark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from findlady_core.errors import InputError
from findlady_core.rotation.attack import ones_basis
from findlady_core.rotation.family import StreamFamily, check_family
from findlady_core.rotation.fold import fold, rotate, unfold

StateDict = Mapping[str, torch.Tensor]
ROTATION_THRESHOLD = 0.5
"""Largest held-out residual at which a rotation is undone (docs/obfuscation.md: copies with
noise 0.1 sit near 0.1, models of other seeds near 1)."""


def procrustes(A_ref: torch.Tensor, A_sus: torch.Tensor, *, fix_ones: bool = False) -> torch.Tensor:
    """The orthogonal ``Q`` minimizing ``|A_ref Q^T - A_sus|`` (rows: the same items, columns:
    the stream); with ``fix_ones``, over the ``Q`` with ``Q 1 = 1`` only."""
    A, B = A_ref.double(), A_sus.double()
    d = A.shape[1]
    if not fix_ones:
        U, _, Vh = torch.linalg.svd(A.T @ B)
        return (U @ Vh).T
    H = ones_basis(d)
    X = procrustes((A @ H)[:, 1:], (B @ H)[:, 1:])  # the rotation of the other d - 1 directions
    inner = torch.eye(d, dtype=torch.float64)
    inner[1:, 1:] = X
    return H @ inner @ H.T


def _stacked(sd: StateDict, family: StreamFamily, names: list[str]) -> torch.Tensor:
    """The fit tables as rows x d, each scaled to unit norm so none dominates by its size."""
    parts = []
    for name in names:
        t = torch.movedim(sd[name].double(), family.axis(name), -1).reshape(-1, family.hidden)
        n = float(t.norm())
        parts.append(t / n if n > 0 else t)
    return torch.cat(parts)


def _centred_gram(t: torch.Tensor, axis: int) -> torch.Tensor | None:
    M = torch.movedim(t.double(), axis, 0).reshape(t.shape[axis], -1)
    G = M @ M.T
    C = G - torch.diagonal(G).mean() * torch.eye(G.shape[0], dtype=G.dtype)
    n = float(C.norm())
    return C / n if n > 0 else None


def held_out_residuals(reference: StateDict, suspect: StateDict, family: StreamFamily,
                       fitted: set[str]) -> dict[str, float]:  # fmt: skip
    """Per held-out stream-side weight: the Gram residual between the two (already in one basis)."""
    out = {}
    for name, axis in family.stream:
        if name in fitted or name not in reference or reference[name].dim() < 2:
            continue
        a, b = _centred_gram(reference[name], axis), _centred_gram(suspect[name], axis)
        if a is None or b is None:
            continue  # a zero or isotropic weight carries no evidence about the basis
        out[name] = float((a - b).norm()) / math.sqrt(2)
    return out


@dataclass
class RotationResult:
    """What the estimate found. ``state_dict``: the suspect in the reference's basis when
    ``applied``, else the suspect as given."""

    state_dict: dict[str, torch.Tensor]
    applied: bool
    residual: float  # median held-out residual (nan: no held-out evidence)
    fit_residual: float  # relative misfit on the fitted tables, for information only
    threshold: float
    fitted_on: list[str]
    held_out: int
    permutation_like: bool  # Q is (close to) a permutation of the stream: nothing was rotated
    Q: torch.Tensor | None = field(default=None, repr=False)
    why: str | None = None  # why nothing could be fit at all (then residual is nan)

    def transform(self, group: str | None = None) -> dict[str, Any] | None:
        """The ``resync.transforms`` entry (None when nothing was undone)."""
        if not self.applied:
            return None
        return {"kind": "rotation", "group": group, "neurons": int(self.Q.shape[0]) if self.Q is not None else None,
                "residual": self.residual, "fit_residual": self.fit_residual, "threshold": self.threshold,
                "fitted_on": self.fitted_on, "held_out": self.held_out, "permutation_like": self.permutation_like}

    def reason(self) -> str:
        if self.applied:
            what = "a permutation of the residual stream" if self.permutation_like else "a residual-stream rotation"
            return (f"{what} was found and undone (held-out residual {self.residual:.3f} <= {self.threshold:g}, "
                    f"fitted on {', '.join(self.fitted_on)}, checked on {self.held_out} other weights)")
        why = self.why or f"held-out residual {self.residual:.3f} > {self.threshold:g}"
        return f"no residual-stream rotation could be estimated with confidence ({why}); the permutation result stands"


def estimate_rotation(reference: StateDict, suspect: StateDict, family: StreamFamily, *,
                      threshold: float = ROTATION_THRESHOLD) -> RotationResult:  # fmt: skip
    """Fit, check and (when the check passes) undo a stream rotation of ``suspect``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise InputError(f"rotation threshold must be a number in (0, 1), got {threshold!r}")
    check_family(family, reference, "reference")
    check_family(family, suspect, "suspect")
    fitted = [n for n, _ in family.tables] + ([family.head] if family.head else [])

    def fallback(why: str) -> RotationResult:
        return RotationResult(_as_given(reference, suspect, family), False, float("nan"), float("nan"),
                              float(threshold), fitted, 0, False, None, why)

    ref_f = fold(reference, family)
    try:
        sus_f = fold(suspect, family)
    except InputError as e:  # a suspect norm weight of 0: nothing to fold, so nothing to undo
        return fallback(str(e))
    A_r, A_s = _stacked(ref_f, family, fitted), _stacked(sus_f, family, fitted)
    if A_r.shape[0] < 2 * family.hidden:  # too few rows: any orthogonal fit looks good
        return fallback(f"the stream tables have {A_r.shape[0]} rows for a {family.hidden}-dimensional stream, "
                        "too few to fit a rotation")
    Q = procrustes(A_r, A_s, fix_ones=family.fixes_ones)
    fit_residual = float((A_r @ Q.T - A_s).norm() / A_s.norm())
    back = rotate(sus_f, family, Q.T)  # the suspect's stream in the reference's basis
    per = held_out_residuals(ref_f, back, family, set(fitted))
    residual = float(torch.tensor(list(per.values())).median()) if per else float("nan")
    applied = bool(per) and residual <= threshold
    state = unfold(back, family, like=reference) if applied else _as_given(reference, suspect, family)
    perm_like = bool((Q.abs().max(dim=1).values > 0.9).all())
    return RotationResult(state, applied, residual, fit_residual, float(threshold), fitted, len(per), perm_like, Q)


def _as_given(reference: StateDict, suspect: StateDict, family: StreamFamily) -> dict[str, torch.Tensor]:
    """The suspect for the permutation result: as given, less an untied head the reference
    stores tied (the rotation attack unties it; the plain shape check would refuse it)."""
    return {k: v for k, v in suspect.items() if k != family.head or k in reference}


def stream_group(spec: Any, family: StreamFamily) -> str | None:
    """The spec group permuting the stream (the one holding the first table's stream axis)."""
    if spec is None:
        return None
    name, axis = family.tables[0]
    for g in spec.groups:
        if any(m.tensor == name and m.axis == axis for m in g.members):
            return g.name
    return None


def undo_rotation(reference: StateDict, suspect: StateDict, family: StreamFamily, *, spec: Any = None,
                  threshold: float = ROTATION_THRESHOLD) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:  # fmt: skip
    """``(suspect in the reference's basis, its resync.transforms entry)``, or the suspect as
    given and None when no rotation passes the held-out check. Call it before ``resync``."""
    r = estimate_rotation(reference, suspect, family, threshold=threshold)
    return r.state_dict, r.transform(stream_group(spec, family))
