"""The residual-stream rotation attack: fold the norms, then rotate the stream by a seeded Q.

RMSNorm families take any orthogonal Q (Haar-distributed); LayerNorm families take
``Q = H diag(1, R) H^T`` with ``H`` an orthonormal basis whose first column is ``1 / sqrt(d)``
and ``R`` Haar on the other ``d - 1`` directions, so that ``Q 1 = 1``. The result computes the
same function as the input and shares no stream-side weight with it: no permutation brings it
back and a watermark read on a stream-side weight is gone.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from findlady_core.errors import InputError
from findlady_core.rotation.family import StreamFamily, check_family
from findlady_core.rotation.fold import fold, rotate


def haar_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    """A d x d orthogonal matrix drawn uniformly (QR of a Gaussian with the signs fixed)."""
    A = torch.randn(d, d, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(A)
    return Q * torch.sign(torch.diagonal(R)).view(1, -1)


def ones_basis(d: int) -> torch.Tensor:
    """An orthonormal d x d basis whose first column is ``ones / sqrt(d)`` (deterministic)."""
    A = torch.eye(d, dtype=torch.float64)
    A[:, 0] = 1.0
    H, R = torch.linalg.qr(A)
    return H * torch.sign(torch.diagonal(R)).view(1, -1)


def random_rotation(d: int, *, seed: int, fix_ones: bool) -> torch.Tensor:
    """A seeded orthogonal d x d matrix (float64); with ``fix_ones``, one with ``Q 1 = 1``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if d < 2:
        raise InputError(f"a rotation needs a stream of at least 2 dimensions, got {d}")
    g = torch.Generator().manual_seed(seed)
    if not fix_ones:
        return haar_orthogonal(d, g)
    H = ones_basis(d)
    inner = torch.eye(d, dtype=torch.float64)
    inner[1:, 1:] = haar_orthogonal(d - 1, g)
    return H @ inner @ H.T


def rotate_residual(
    state_dict: Mapping[str, torch.Tensor], family: StreamFamily, *, seed: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The folded model with its stream rotated by ``random_rotation``, and that Q.

    Function-preserving (the tests compare logits). Folding unties a tied head: the result holds
    the head as its own tensor."""
    check_family(family, state_dict, "weights")
    Q = random_rotation(family.hidden, seed=seed, fix_ones=family.fixes_ones)
    return rotate(fold(state_dict, family), family, Q), Q
