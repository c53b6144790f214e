"""Residual-stream rotations of transformers: the family's stream-side tensors (``family``),
norm folding and the rotation itself (``fold``), the seeded attack (``attack``), and the
estimate that finds a rotation, checks it on held-out evidence and undoes it (``estimate``)."""

from findlady_core.rotation.attack import random_rotation, rotate_residual
from findlady_core.rotation.estimate import ROTATION_THRESHOLD, RotationResult, estimate_rotation, undo_rotation
from findlady_core.rotation.family import StreamFamily, family_from_config, load_config
from findlady_core.rotation.fold import fold, rotate, unfold

__all__ = [
    "ROTATION_THRESHOLD", "RotationResult", "StreamFamily", "estimate_rotation", "family_from_config", "fold",
    "load_config", "random_rotation", "rotate", "rotate_residual", "undo_rotation", "unfold",
]
