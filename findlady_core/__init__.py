"""FindLady core: permutation specs, re-synchronization, integrity and watermark checks.

A pure library: no web, no database, no command line. See ``findlady_core.permute`` for the
one permutation convention used everywhere: re-synchronizing with ``p`` means
``resynced = suspect.index_select(axis, p)`` on every member axis of a group.
"""

from typing import Any

from findlady_core.errors import FindLadyError, InputError, SpecError, WeightsError

__all__ = ["FindLadyError", "InputError", "SpecError", "WeightsError", "Group", "Member", "Spec"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Spec and its parts import torch: loaded on first use, so that a torch-free module of the
    # package (``attack_steps``, read by ``findlady attack --help``) stays fast to import.
    if name in ("Group", "Member", "Spec"):
        from findlady_core import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'findlady_core' has no attribute {name!r}")
