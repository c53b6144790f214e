"""Permutation specs from a state dict alone, when no module is at hand.

Two sources, best first: a registered architecture family (``findlady_core.families``: BERT), else a plain chain
guessed from tensor names and shapes. The guess cannot see residual connections or
concatenations, so it warns; trace the module (``findlady_core.trace``) whenever you can.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from findlady_core import families
from findlady_core.errors import SpecError
from findlady_core.spec import Group, Member, Spec

CHAIN_WARNING = (
    "spec guessed from tensor names and shapes as a plain chain of layers; it is wrong for branching "
    "models (residual connections, concatenations): trace the module instead when you can"
)


@dataclass
class _Layer:
    prefix: str  # the weight's name without ".weight": the group name of its outputs
    weight: str
    shape: tuple[int, ...]
    attached: list[str] = field(default_factory=list)  # 1-D tensors (bias, norm) after this weight

    @property
    def is_conv(self) -> bool:
        return len(self.shape) >= 3

    @property
    def depthwise(self) -> bool:
        return self.is_conv and self.shape[1] == 1


def _layers(state_dict: Mapping[str, torch.Tensor]) -> list[_Layer]:
    """Weights of 2+ dims in state-dict order, each with the 1-D float tensors that follow it."""
    layers: list[_Layer] = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() == 0:
            continue  # integer buffers (num_batches_tracked) and scalars never move
        if t.dim() >= 2:
            prefix = name[: -len(".weight")] if name.endswith(".weight") else name
            layers.append(_Layer(prefix, name, tuple(t.shape)))
        elif layers:
            last = layers[-1]
            if t.shape[0] != last.shape[0]:
                raise SpecError(
                    f"cannot guess a chain: 1-D tensor {name!r} has {t.shape[0]} entries but the layer before "
                    f"it, {last.weight!r}, has {last.shape[0]} outputs"
                )
            last.attached.append(name)
    return layers


def _natural_order(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors sorted by module path with numbers compared as numbers, each module's 2+-D weight
    before its 1-D tensors. safetensors files store names sorted as strings (``layers.10``
    before ``layers.2``, ``bias`` before ``weight``), which loses the registration order."""

    def key(name: str) -> tuple:
        module, _, leaf = name.rpartition(".")
        parts = tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"\.", module) if x)
        t = state_dict[name]
        return parts, 0 if isinstance(t, torch.Tensor) and t.dim() >= 2 else 1, leaf

    return {k: state_dict[k] for k in sorted(state_dict, key=key)}


@families.family("chain")
def infer_chain_spec(state_dict: Mapping[str, torch.Tensor]) -> Spec:
    """A spec for a plain chain guessed from names and shapes: in the dict's order first, then,
    if that does not chain (a safetensors file sorts names), in natural module order."""
    try:
        spec = _chain_spec(state_dict)
    except SpecError as first:
        try:
            spec = _chain_spec(_natural_order(state_dict))
        except SpecError:
            raise SpecError(
                f"{first} (natural module order did not chain either; trace the module or give a spec)"
            ) from None
    warnings.warn(CHAIN_WARNING, UserWarning, stacklevel=2)
    return spec


def _chain_spec(state_dict: Mapping[str, torch.Tensor]) -> Spec:
    """A spec for a plain chain (MLP or CNN without branches) from names and shapes alone.

    Consecutive weights chain when the outputs of one equal the inputs of the next, or, for a
    conv feeding a linear layer, when the inputs are a multiple k of the conv's channels (a
    flatten: block k). A depthwise conv (weight ``(C, 1, ...)``) moves with the channels before
    it. Biases and norm tensors that follow a weight join its group. The last layer's outputs
    are the model's output and stay put. Warns (``UserWarning``) that it is a guess; raises
    ``SpecError`` when the shapes do not chain.
    """
    layers = _layers(state_dict)
    if len(layers) < 2:
        raise SpecError(f"cannot guess a chain: found {len(layers)} weight tensor(s) of 2+ dims, need at least 2")
    groups: list[Group] = []
    members: list[Member] = []
    name = ""
    size = 0
    for prev, nxt in zip(layers[:-1], layers[1:]):
        if not members:  # `prev` starts a new group: its outputs and what follows them
            name, size = prev.prefix, prev.shape[0]
            members = [Member(prev.weight, 0)] + [Member(t, 0) for t in prev.attached]
        if nxt.depthwise and nxt.shape[0] == size:
            members += [Member(nxt.weight, 0)] + [Member(t, 0) for t in nxt.attached]
            continue  # the group goes on through the depthwise conv to its consumer
        n_in = nxt.shape[1]
        if n_in == size:
            block = 1
        elif prev.is_conv and len(nxt.shape) == 2 and n_in % size == 0:
            block = n_in // size  # conv -> flatten -> linear: each channel is `block` inputs
        else:
            raise SpecError(
                f"cannot guess a chain: {prev.weight!r} has {size} output channels but the next weight, "
                f"{nxt.weight!r} {list(nxt.shape)}, takes {n_in} inputs"
            )
        members.append(Member(nxt.weight, 1, block=block))
        groups.append(Group(name, size, tuple(members)))
        members = []
    spec = Spec(tuple(groups), {"source": "chain"})
    spec.validate(state_dict)
    return spec


def infer_spec(state_dict: Mapping[str, torch.Tensor], family: str | None = None) -> Spec:
    """The best spec obtainable from weights alone: the registered family's (detected from
    tensor names when ``family`` is None), else ``infer_chain_spec`` (``family="chain"``)."""
    return families.build(family or families.detect(state_dict) or "chain", state_dict)


__all__ = ["infer_chain_spec", "infer_spec", "CHAIN_WARNING"]
