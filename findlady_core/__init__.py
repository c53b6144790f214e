"""FindLady core: permutation specs, re-synchronization, integrity and watermark checks.

A pure library: no web, no database, no command line. See ``findlady_core.permute`` for the
one permutation convention used everywhere: re-synchronizing with ``p`` means
``resynced = suspect.index_select(axis, p)`` on every member axis of a group.
"""

from findlady_core.errors import FindLadyError, InputError, SpecError, WeightsError
from findlady_core.spec import Group, Member, Spec

__all__ = ["FindLadyError", "InputError", "SpecError", "WeightsError", "Group", "Member", "Spec"]
__version__ = "0.1.0"
