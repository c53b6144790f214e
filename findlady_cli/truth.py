"""Truth files (``findlady.truth/1``): the recovering permutation of every group, written by
``findlady attack --truth`` and read by ``findlady resync --truth`` to print Psi.

    {"format": "findlady.truth/1", "groups": {"fc1": [2, 0, 1, ...], ...}}

Applying a group's list ``p`` as ``suspect.index_select(axis, p)`` puts the suspect back in
the reference order (the convention of ``findlady_core.permute``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TRUTH_FORMAT = "findlady.truth/1"
MAX_TRUTH_BYTES = 256 * 1024 * 1024  # a truth file holds one int per neuron: generous


def write_truth(path: str | Path, truth: Mapping[str, Any], origins: Mapping[str, Any] | None = None) -> None:
    """``origins`` (groups whose width an attack changed): per suspect position, the reference
    neuron it came from, ``-1`` for a dummy; those groups have no permutation in ``groups``."""
    import torch

    doc: dict[str, Any] = {"format": TRUTH_FORMAT,
                           "groups": {k: [int(i) for i in torch.as_tensor(v).tolist()] for k, v in truth.items()}}
    if origins:
        doc["origins"] = {k: [int(i) for i in torch.as_tensor(v).tolist()] for k, v in origins.items()}
    Path(path).write_text(json.dumps(doc) + "\n")


def load_truth(path: str | Path, spec: Any) -> dict[str, Any]:
    """Read a truth file and check each entry is a permutation of its spec group's size."""
    from findlady_core.errors import InputError
    from findlady_core.permute import as_perm

    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_TRUTH_BYTES:
            raise InputError(f"truth file {p.name} has {size} bytes, more than {MAX_TRUTH_BYTES}")
        data = json.loads(p.read_bytes())
    except OSError as e:
        raise InputError(f"cannot read truth file {p.name}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"truth file {p.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != TRUTH_FORMAT or not isinstance(data.get("groups"), dict):
        raise InputError(f"truth file {p.name} must be a {TRUTH_FORMAT!r} object with a 'groups' mapping")
    out: dict[str, Any] = {}
    for name, perm in data["groups"].items():
        g = spec.group(name)  # SpecError naming the unknown group
        if not isinstance(perm, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in perm):
            raise InputError(f"truth file {p.name}: group {name!r} must be a list of integers")
        out[name] = as_perm(perm, g.size, name)
    return out
