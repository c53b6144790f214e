"""Walk a ``torch.export`` graph and give every dimension of every value an axis id.

A tensor value's *layout* is a tuple (an op with several tensor outputs gives a list of them) with one entry per dimension:

- an ``int``: the axis id of that dimension;
- ``FREE``: the value does not vary along the dimension (size 1, or broadcast by ``expand``), so
  any permutation of it leaves the value unchanged;
- ``Dep(dim, kids)``: the dimension's axis depends on the position along dimension ``dim``
  (the dims inside head ``i`` are axis ``kids[i]``), as after a head split.

Parameters and buffers start with one fresh axis per dimension; the model's inputs and outputs
are pinned. Each op's rule (``rules.py``) joins, refines or pins axes. An op without a rule pins
every axis it touches and says so in the warnings: a spec is never wrong, at worst incomplete.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from findlady_core.derive.axes import Axes


class _Free:
    def __repr__(self) -> str:
        return "FREE"


FREE = _Free()


@dataclass(frozen=True)
class Dep:
    dim: int
    kids: tuple[int, ...]


Entry = int | _Free | Dep
Layout = tuple[Entry, ...]


class _Meta:
    """Not a tensor (a size, a dtype, None)."""


META = _Meta()

COMPUTED = "joined elementwise with a tensor computed from the inputs alone (e.g. rotary cos/sin)"
NOTABLE = {COMPUTED}
CONSTANTS = {f"aten::{n}" for n in "zeros ones full empty scalar_tensor zeros_like ones_like full_like empty_like new_zeros new_ones new_full new_empty".split()}

RULES: dict[str, Callable[[Walker, fx.Node], Any]] = {}


def rule(*names: str) -> Callable[[Callable[[Walker, fx.Node], Any]], Callable[[Walker, fx.Node], Any]]:
    """Register ``fn`` as the rule of the named aten ops (``aten::linear``: every overload)."""

    def deco(fn: Callable[[Walker, fx.Node], Any]) -> Callable[[Walker, fx.Node], Any]:
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def op_name(node: fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    schema = getattr(t, "_schema", None)
    return schema.name if schema is not None else str(t)


@dataclass
class Use:
    """One parameter or buffer of the traced module."""

    fqn: str
    shape: tuple[int, ...]
    axes: tuple[int, ...]
    floating: bool
    used: bool = False


class Walker:
    def __init__(self, ep: torch.export.ExportedProgram, storable: Callable[[str], bool]) -> None:
        self.ep = ep
        self.axes = Axes()
        self.env: dict[fx.Node, Any] = {}
        self.params: dict[str, Use] = {}  # fqn -> use
        self.roles: dict[tuple[str, int], str] = {}  # (fqn, dim) -> "in" or "out", first use wins
        self.axis_owner: dict[int, tuple[str, int]] = {}  # fresh parameter axis -> (fqn, dim)
        self.outputs: list[Layout] = []
        self.storable = storable
        self.unknown: dict[str, int] = {}
        self.node: fx.Node | None = None
        self.from_input: set[fx.Node] = set()  # values computed from the model's inputs alone

    # --- values -----------------------------------------------------------------------------

    def shape(self, a: Any) -> tuple[int, ...]:
        return shape_of(a.meta["val"])

    def fixed(self, shape: Iterable[int], why: str = "input") -> Layout:
        """A pinned axis per dimension; ``why`` becomes a pin reason when it is a notable one."""
        out: list[Entry] = []
        for s in shape:
            if s == 1:
                out.append(FREE)
                continue
            i = self.axes.new(s, why, pinned=True)
            if why in NOTABLE:
                self.axes.reasons[i] = [why]
            out.append(i)
        return tuple(out)

    def lay(self, a: Any) -> Layout:
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if not isinstance(v, tuple):
            raise TypeError(f"{a} is not a tensor value")
        return v

    def live_entry(self, e: Entry) -> bool:
        if isinstance(e, int):
            return self.axes.live(e)
        if isinstance(e, Dep):
            return any(self.axes.live(k) for k in e.kids)
        return False

    def live(self, lay: Layout) -> bool:
        return any(self.live_entry(e) for e in lay)

    def tensor_inputs(self, node: fx.Node) -> list[Layout]:
        out = []
        for a in node.all_input_nodes:
            v = self.env.get(a)
            if isinstance(v, list):  # several tensors (split's output)
                out.extend(x for x in v if isinstance(x, tuple))
            elif isinstance(v, tuple):
                out.append(v)
        return out

    # --- joining and pinning ----------------------------------------------------------------

    def pin(self, e: Entry, why: str | None = None) -> None:
        if isinstance(e, int):
            self.axes.pin(e, why)
        elif isinstance(e, Dep):
            for k in e.kids:
                self.axes.pin(k, why)

    def pin_all(self, lays: Iterable[Layout], why: str | None = None) -> None:
        for lay in lays:
            for e in lay:
                self.pin(e, why)

    def tie(self, a: Entry, b: Entry) -> None:
        """The same permutation must act on both entries (of the same length)."""
        if isinstance(a, _Free) or isinstance(b, _Free):
            return
        if isinstance(a, int) and isinstance(b, int):
            self.axes.union(a, b)
        elif isinstance(a, Dep) and isinstance(b, Dep):
            if a.dim == b.dim and len(a.kids) == len(b.kids):
                for x, y in zip(a.kids, b.kids):
                    self.axes.union(x, y)
            else:
                self.pin(a, "dims inside heads joined across differently laid out tensors")
                self.pin(b, "dims inside heads joined across differently laid out tensors")
        else:
            d, x = (a, b) if isinstance(a, Dep) else (b, a)
            assert isinstance(d, Dep) and isinstance(x, int)
            for k in d.kids:  # one tensor uniform along the heads: every head's dims alike
                self.axes.union(k, x)

    def broadcast(self, lays: list[Layout], shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> Layout:
        """Join operands of an elementwise op dimension by dimension (numpy broadcasting)."""
        n = len(out_shape)
        aligned = [align(lay, n) for lay in lays]
        sizes = [(1,) * (n - len(s)) + tuple(s) for s in shapes]
        out: list[Entry] = []
        for d in range(n):
            ents = [lay[d] for lay, s in zip(aligned, sizes) if s[d] != 1 and not isinstance(lay[d], _Free)]
            for e in ents[1:]:
                self.tie(ents[0], e)
            out.append(ents[0] if ents else FREE)
        return tuple(out)

    def role(self, lay: Layout, dim: int, role: str) -> None:
        """Note which parameter axis is a neuron's own (out) or a consumer's input (in)."""
        e = lay[dim]
        if isinstance(e, int) and e in self.axis_owner:
            self.roles.setdefault(self.axis_owner[e], role)

    # --- the walk ---------------------------------------------------------------------------

    def run(self, pin_outputs: bool = True) -> None:
        sig = self.ep.graph_signature
        params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        consts = set(sig.inputs_to_lifted_tensor_constants) | set(getattr(sig, "inputs_to_lifted_custom_objs", {}))
        for node in self.ep.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                val = node.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    self.env[node] = META
                elif node.name in params:
                    self.env[node] = self.parameter(node, params[node.name], val)
                else:
                    self.env[node] = self.fixed(self.shape(node), "input" if node.name not in consts else "constant")
                    if node.name not in consts:
                        self.from_input.add(node)
            elif node.op == "call_function":
                self.env[node] = self.visit(node)
            elif node.op == "output":
                outs = [self.env.get(a) for a in _flat(node.args)]
                keys = output_keys(self.ep, len(outs))
                self.outputs = [o for o in outs if isinstance(o, tuple)]
                for o, key in zip(outs, keys):
                    # a task's outputs (logits) must not change; hidden states may move with
                    # their groups (the self-check compares them after the same permutation)
                    if isinstance(o, tuple) and (pin_outputs or key not in MOVING_OUTPUTS):
                        self.pin_all([o])
            else:
                raise TypeError(f"unexpected graph node {node.op}")

    def parameter(self, node: fx.Node, fqn: str, val: torch.Tensor) -> Layout:
        shape = tuple(int(s) for s in val.shape)
        floating = val.is_floating_point()
        ok = floating and self.storable(fqn)
        ids = tuple(self.axes.new(s, f"{fqn}:{d}", pinned=not ok) for d, s in enumerate(shape))
        for d, i in enumerate(ids):
            self.axis_owner[i] = (fqn, d)
        self.params[fqn] = Use(fqn, shape, ids, floating, used=bool(node.users))
        return tuple(FREE if s == 1 else i for s, i in zip(shape, ids))

    def visit(self, node: fx.Node) -> Any:
        name = op_name(node)
        fn = RULES.get(name)
        val = node.meta.get("val")
        dead = not node.users and not name.endswith("_")  # an unused value (not an in-place op)
        if (dead or not self.live_any(node)) and name != "getitem":
            # No permutable axis in (or the value is never used), none out. A constant (zeros, ones) is FREE along every
            # dim. Anything else varies along its dims: a live axis joined with it is pinned,
            # and where it is not the model's input (rotary cos/sin, position tables) that is
            # worth a warning.
            if name in CONSTANTS and isinstance(val, torch.Tensor):
                return tuple(FREE for _ in val.shape)
            from_input = any(a in self.from_input for a in node.all_input_nodes)
            if from_input:
                self.from_input.add(node)
            why = "input" if from_input else COMPUTED
            if isinstance(val, torch.Tensor):
                return self.fixed(self.shape(node), why)
            if isinstance(val, (list, tuple)):
                return [self.fixed(shape_of(v), why) if isinstance(v, torch.Tensor) else META for v in val]
            return META
        if fn is None:
            return self.unknown_op(node, name)
        try:
            out = fn(self, node)
        except _Unsupported as e:
            return self.unknown_op(node, name, str(e))
        if isinstance(out, tuple) and isinstance(val, torch.Tensor):
            out = tuple(FREE if s == 1 else e for e, s in zip(out, self.shape(node)))  # nothing to permute
        return out

    def live_any(self, node: fx.Node) -> bool:
        return any(self.live(lay) for lay in self.tensor_inputs(node))

    def unknown_op(self, node: fx.Node, name: str, detail: str = "") -> Any:
        """No exact rule: pin every axis of the inputs, pinned outputs."""
        if self.live_any(node):
            self.unknown[name] = self.unknown.get(name, 0) + 1
            why = f"op {name}: {detail}" if detail else f"op {name} has no exact rule"
            self.pin_all(self.tensor_inputs(node), why)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return self.fixed(self.shape(node), "unknown op")
        if isinstance(val, (list, tuple)):
            return [self.fixed(shape_of(v)) if isinstance(v, torch.Tensor) else META for v in val]
        return META


MOVING_OUTPUTS = {"last_hidden_state", "encoder_last_hidden_state", "pooler_output", "hidden_states",
                  "encoder_hidden_states", "decoder_hidden_states"}


def output_keys(ep: torch.export.ExportedProgram, n: int) -> list[str | None]:
    """The ModelOutput field of each flat output (None where the output has no names)."""
    try:
        spec = ep.call_spec.out_spec
        keys = list(spec.context) if isinstance(spec.context, list) else None
        if keys is None or len(keys) != spec.num_children:
            return [None] * n
        out: list[str | None] = []
        for i, k in enumerate(keys):
            out += [str(k)] * spec.child(i).num_leaves
        return out if len(out) == n else [None] * n
    except Exception:  # an output structure we cannot name: every output stays pinned
        return [None] * n


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    """Static sizes; a data-dependent size (boolean-mask indexing) is refused."""
    try:
        return tuple(int(s) for s in t.shape)
    except Exception:
        raise SizeError("the model has a data-dependent shape (boolean-mask indexing)") from None


class SizeError(Exception):
    pass


class _Unsupported(Exception):
    """A rule met a case it does not handle exactly: the op is treated as unknown."""


def unsupported(why: str) -> _Unsupported:
    return _Unsupported(why)


def align(lay: Layout, n: int) -> Layout:
    """Left-pad a layout with FREE to ``n`` dims (broadcasting), shifting Dep references."""
    pad = n - len(lay)
    if pad <= 0:
        return lay
    return (FREE,) * pad + tuple(Dep(e.dim + pad, e.kids) if isinstance(e, Dep) else e for e in lay)


def _flat(a: Any) -> Iterable[Any]:
    if isinstance(a, (list, tuple)):
        for x in a:
            yield from _flat(x)
    else:
        yield a
