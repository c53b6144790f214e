"""The graph walk behind ``findlady_core.trace``: channel layouts, the union-find of axis ids,
and the dispatch of every fx node to its op rule (``findlady_core/trace_rules.py``).

Every tensor value gets a *channel layout*: which dimension holds its features and which "axis
ids" those features belong to. A Linear/Conv output creates a new axis id; channel-preserving
ops pass ids on; residual adds and gates tie ids with a union-find. Like a ``torch.fx``
interpreter, each node goes to the one rule registered for its target (a module type, a
function, or a ``Tensor`` method name); a node without one fails loudly (``TraceError``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from findlady_core.errors import TraceError

Seg = tuple[int, int, int]  # (axis id, count, block): `count` channels of `block` elements each


@dataclass(frozen=True)
class Chan:
    """A tensor whose dimension ``dim`` holds channels, made of ``segs`` laid end to end.

    ``dim`` is None for a network input: its layout is unknown and its single id is a boundary.
    """

    dim: int | None
    segs: tuple[Seg, ...]


class _Inv:
    """A tensor that no permutation changes (a constant, a reduction over channels)."""


class _Meta:
    """A value that is not a tensor: sizes, dtypes, Python numbers."""


INV = _Inv()
META = _Meta()
Value = Chan | _Inv | _Meta


@dataclass
class _Member:
    tensor: str
    axis: int
    offset: int
    block: int
    role: str | None
    order: int  # graph position, for sorting members and groups
    seq: int


class _Axes:
    """Union-find over axis ids; each id knows its size, producer and members."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []  # -1 for a boundary id of unknown size
        self.boundary: list[bool] = []
        self.producer: list[tuple[int, str] | None] = []
        self.members: list[list[_Member]] = []

    def new(self, size: int, producer: tuple[int, str] | None = None, boundary: bool = False) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(size)
        self.boundary.append(boundary)
        self.producer.append(producer)
        self.members.append([])
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.size[ra], self.size[rb]
        if sa >= 0 and sb >= 0 and sa != sb:
            raise TraceError(f"{where}: cannot tie channel axes of sizes {sa} and {sb}")
        self.parent[rb] = ra
        self.size[ra] = max(sa, sb)
        self.boundary[ra] = self.boundary[ra] or self.boundary[rb]


def _prod(xs: Any) -> int:
    return math.prod(int(x) for x in xs)


# ---------------------------------------------------------------------------------------------
# the rule registry: one handler per op, like a torch.fx interpreter

Rule = Callable[["Walker", fx.Node, Any], "Value"]  # (walker, node, module or None) -> the output's layout


@dataclass(frozen=True)
class _Entry:
    handler: Rule
    params: bool  # the rule places parameter arguments itself (else they are refused as data)


MODULE_RULES: dict[type, _Entry] = {}
FUNCTION_RULES: dict[Any, _Entry] = {}
METHOD_RULES: dict[str, _Entry] = {}


def rule(*targets: Any, params: bool = False) -> Callable[[Rule], Rule]:
    """Register the decorated handler for ``targets``: ``nn.Module`` subclasses (matched along
    the module's class hierarchy), functions (``F.relu``, ``operator.add``) or ``Tensor``
    method names (``"view"``). ``params=True`` when the handler reads parameter arguments
    (a functional conv's weight); otherwise a parameter used as data is refused before it runs."""

    def register(handler: Rule) -> Rule:
        for t in targets:
            table: dict[Any, _Entry] = (
                METHOD_RULES if isinstance(t, str) else MODULE_RULES if isinstance(t, type) and issubclass(t, nn.Module)
                else FUNCTION_RULES
            )  # fmt: skip
            if t in table:
                raise ValueError(f"trace rule for {t!r} registered twice")
            table[t] = _Entry(handler, params)
        return handler

    return register


def _module_rule(mod: nn.Module) -> _Entry | None:
    for cls in type(mod).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None


def _op_name(node: fx.Node, module: nn.Module | None = None) -> str:
    if node.op == "call_module" and module is not None:
        return f"module {type(module).__module__}.{type(module).__qualname__} ({node.target})"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    return f"function {mod + '.' if mod else ''}{name}"


class Walker:
    """One pass over an fx graph that assigns channel layouts and collects group members."""

    def __init__(self, gm: fx.GraphModule, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.gm = gm
        self.shapes = shapes  # state-dict name -> shape: the tensors a spec may name
        self.keys = shapes.keys()
        self.modules = dict(gm.named_modules())
        self.axes = _Axes()
        self.env: dict[fx.Node, Value] = {}
        self.order = 0
        self.seq = 0
        self.claims: dict[tuple[str, int, int], str] = {}
        self.node: fx.Node | None = None

    # -- helpers ------------------------------------------------------------------------------

    @property
    def where(self) -> str:
        n = self.node
        return f"node {n.name!r}" if n is not None else "graph"

    def fail(self, msg: str) -> TraceError:
        return TraceError(f"{self.where}: {msg}")

    def shape(self, node: Any) -> tuple[int, ...]:
        tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        if tm is None or not hasattr(tm, "shape"):
            raise self.fail(f"expected a tensor for {node}, found none in shape propagation")
        return tuple(int(s) for s in tm.shape)

    def value(self, a: Any) -> Value:
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, Tensor):
            return INV
        return META

    def tensor_arg(self, a: Any, what: str) -> Value:
        v = self.value(a)
        if isinstance(v, _Meta):
            raise self.fail(f"{what}: expected a tensor")
        return v

    def param_name(self, a: Any, what: str) -> str | None:
        """State-dict name of a parameter argument (a get_attr node), None when absent."""
        if a is None:
            return None
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.target in self.keys:
            return str(a.target)
        raise self.fail(f"{what} is not a parameter of the module (computed weights are not supported)")

    def add(self, axis_id: int, tensor: str, axis: int, offset: int = 0, block: int = 1, role: str | None = None) -> None:
        if tensor not in self.keys:
            raise self.fail(f"tensor {tensor!r} moves with the channels but is not in the state dict")
        key = (tensor, axis, offset)
        if key in self.claims:
            raise self.fail(
                f"tensor {tensor!r} axis {axis} is used twice (a module called more than once, or tied "
                "weights): a shared layer cannot be given one permutation per use"
            )
        self.claims[key] = tensor
        self.seq += 1
        self.axes.members[axis_id].append(_Member(tensor, axis, offset, block, role, self.order, self.seq))

    def add_layout(self, lay: Chan, tensor: str, axis: int, role: str | None = None, scale: int = 1) -> None:
        """Members for a tensor axis indexed like ``lay``'s channels (``scale`` repeats each element)."""
        if lay.dim is None:
            return  # the network input: not permutable, so no member
        off = 0
        for i, n, b in lay.segs:
            self.add(i, tensor, axis, off * scale, b * scale, role)
            off += n * b

    def produce(self, size: int, ndim_dim: int, name: str, weight: str | None, bias: str | None,
                weight_axis: int = 0) -> Chan:  # fmt: skip
        i = self.axes.new(size, (self.order, name))
        if weight is not None:
            self.add(i, weight, weight_axis, role="out" if weight_axis != 0 else None)
        if bias is not None:
            self.add(i, bias, 0)
        return Chan(ndim_dim, ((i, size, 1),))

    def tie(self, a: Chan, b: Chan) -> None:
        if a.dim is None or b.dim is None:
            bid = (a if a.dim is None else b).segs[0][0]
            for i, _, _ in (b if a.dim is None else a).segs:
                self.axes.union(bid, i, self.where)
            return
        if [(n, blk) for _, n, blk in a.segs] != [(n, blk) for _, n, blk in b.segs]:
            raise self.fail(f"cannot tie channel layouts {self.describe(a)} and {self.describe(b)}")
        for (i, _, _), (j, _, _) in zip(a.segs, b.segs):
            self.axes.union(i, j, self.where)

    def describe(self, lay: Chan) -> str:
        return "+".join(f"{n}x{b}" if b != 1 else str(n) for _, n, b in lay.segs)

    def channel_dim(self, v: Value, ndim: int, expected: int, what: str) -> Chan:
        if not isinstance(v, Chan):
            raise self.fail(f"{what} expects channels at dim {expected}, got a tensor without channels")
        if v.dim is not None and v.dim != expected:
            raise self.fail(f"{what} reads channels at dim {expected} but they are at dim {v.dim} (ndim {ndim})")
        return v

    # -- the vocabulary of rules --------------------------------------------------------------------------------

    def linear(self, x: Any, name: str, weight: str, bias: str | None, out_features: int) -> Chan:
        shape = self.shape(x)
        lay = self.channel_dim(self.tensor_arg(x, "linear input"), len(shape), len(shape) - 1, "linear layer")
        self.add_layout(lay, weight, 1)
        return self.produce(out_features, len(shape) - 1, name, weight, bias)

    def conv(self, x: Any, name: str, weight: str, bias: str | None, groups: int, k: int,
             transposed: bool = False) -> Chan:  # fmt: skip
        shape = self.shape(x)
        c = len(shape) - k - 1
        lay = self.channel_dim(self.tensor_arg(x, "conv input"), len(shape), c, "convolution")
        w = self.shapes[weight]
        cin = shape[c]
        cout = w[1] * groups if transposed else w[0]
        if groups == 1:
            if transposed:
                self.add_layout(lay, weight, 0, role="in")
                return self.produce(cout, c, name, weight, bias, weight_axis=1)
            self.add_layout(lay, weight, 1)
            return self.produce(cout, c, name, weight, bias)
        if groups == cin and not transposed and cout % cin == 0:
            # Depthwise: output channel j reads input channel j // m only, so the output
            # channels move with the input's (in blocks of m) and the weight's rows with them.
            m = cout // cin
            self.add_layout(lay, weight, 0, scale=m)
            if bias is not None:
                self.add_layout(lay, bias, 0, scale=m)
            if lay.dim is None:
                return lay
            return Chan(c, tuple((i, n, b * m) for i, n, b in lay.segs))
        raise self.fail(f"grouped convolution {name!r} (groups={groups}, {cin} input channels) is not supported")

    def norm(self, x: Any, params: list[str | None], dim: int, what: str) -> Chan:
        shape = self.shape(x)
        lay = self.channel_dim(self.tensor_arg(x, what), len(shape), dim, what)
        for p in params:
            if p is not None:
                self.add_layout(lay, p, 0)
        return lay

    def layer_norm(self, x: Any, normalized: tuple[int, ...], weight: str | None, bias: str | None) -> Value:
        shape = self.shape(x)
        v = self.tensor_arg(x, "layer norm input")
        if not isinstance(v, Chan) or v.dim is None:
            return v
        first = len(shape) - len(normalized)
        if v.dim < first:
            return v  # normalizes within each channel: parameters are not indexed by channel
        axis = v.dim - first
        for p in (weight, bias):
            if p is not None:
                self.add_layout(v, p, axis, role="out" if axis else None)
        return v

    def spatial(self, x: Any, k: int, what: str) -> Value:
        v = self.tensor_arg(x, what)
        shape = self.shape(x)
        if isinstance(v, Chan) and v.dim is not None and v.dim >= len(shape) - k:
            raise self.fail(f"{what} acts on the last {k} dims, which include the channel dim {v.dim}")
        return v

    def reshape(self, x: Any, out_shape: tuple[int, ...]) -> Value:
        v = self.tensor_arg(x, "reshape input")
        if not isinstance(v, Chan) or v.dim is None:
            return v
        a, c = self.shape(x), v.dim
        lead, inner = _prod(a[:c]), _prod(a[c + 1 :])
        for c2 in range(len(out_shape)):
            if _prod(out_shape[:c2]) != lead:
                continue
            inner2 = _prod(out_shape[c2 + 1 :])
            if inner2 > 0 and inner % inner2 == 0 and out_shape[c2] * inner2 == a[c] * inner:
                # Row-major: element j of the new dim lies in channel j // k, k = inner / inner2.
                k = inner // inner2
                return Chan(c2, tuple((i, n, b * k) for i, n, b in v.segs))
        raise self.fail(f"reshape from {a} to {out_shape} splits or scatters the channel dim {c}")

    def reduce(self, x: Any, dims: Any, keepdim: bool) -> Value:
        v = self.tensor_arg(x, "reduction input")
        if not isinstance(v, Chan) or v.dim is None:
            return v
        ndim = len(self.shape(x))
        if dims is None:
            return INV
        ds = {int(d) % ndim for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if v.dim in ds:
            return INV  # a sum/mean/max over all channels does not depend on their order
        if keepdim:
            return v
        return Chan(v.dim - sum(1 for d in ds if d < v.dim), v.segs)

    def binary(self, a: Any, b: Any) -> Value:
        va, vb = self.value(a), self.value(b)
        if isinstance(va, _Meta) and isinstance(vb, _Meta):
            return META
        if isinstance(va, _Meta) or isinstance(vb, _Meta):
            return vb if isinstance(va, _Meta) else va  # tensor with a Python number
        out_nd = len(self.shape(self.node))

        def aligned(node: Any, v: Value) -> tuple[Chan | None, tuple[int, ...]]:
            shape = self.shape(node) if isinstance(node, fx.Node) else tuple(node.shape)
            shape = (1,) * (out_nd - len(shape)) + shape
            if isinstance(v, Chan):
                d = None if v.dim is None else v.dim + out_nd - len(self.shape(node))
                return Chan(d, v.segs), shape
            return None, shape

        la, sa = aligned(a, va)
        lb, sb = aligned(b, vb)
        if la is None and lb is None:
            return INV
        if la is None or lb is None:
            lay, other = (lb, sa) if la is None else (la, sb)
            if lay.dim is not None and other[lay.dim] != 1:
                raise self.fail("a constant tensor indexed by channel meets a permutable tensor")
            return lay
        if la.dim is None or lb.dim is None:
            self.tie(la, lb)
            return la if la.dim is None else lb
        if la.dim == lb.dim:
            na, nb = sa[la.dim], sb[lb.dim]
            if na == nb:
                self.tie(la, lb)  # residual add, or a per-channel gate: the same channels
                return la
            if nb == 1:
                return la  # b broadcasts over a's channels (e.g. a spatial attention map)
            if na == 1:
                return lb
        raise self.fail("an elementwise op combines two tensors whose channels lie on different dims")

    def cat(self, tensors: Any, dim: int) -> Value:
        vals = [self.tensor_arg(t, "cat input") for t in tensors]
        nd = len(self.shape(self.node))
        d = dim % nd
        lays = [v for v in vals if isinstance(v, Chan)]
        if len(lays) != len(vals):
            raise self.fail("torch.cat mixes permutable tensors with constant ones")
        if any(v.dim is None for v in lays):
            for v in lays[1:]:
                self.tie(lays[0], v)
            return next(v for v in lays if v.dim is None)
        if all(v.dim == d for v in lays):
            return Chan(d, tuple(s for v in lays for s in v.segs))  # channels laid end to end
        if any(v.dim == d for v in lays) or len({v.dim for v in lays}) != 1:
            raise self.fail(f"torch.cat along dim {d} where the inputs' channels lie on different dims")
        for v in lays[1:]:
            self.tie(lays[0], v)
        return lays[0]

    def move_dims(self, node: fx.Node, kind: str) -> Value:
        x = node.args[0]
        v = self.tensor_arg(x, kind)
        if not isinstance(v, Chan) or v.dim is None:
            return v
        nd = len(self.shape(x))
        rest = node.args[1:]
        if kind == "transpose":
            a, b = (int(d) % nd for d in rest)
            perm = list(range(nd))
            perm[a], perm[b] = b, a
        else:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            dims = dims or node.kwargs.get("dims")
            perm = [int(d) % nd for d in dims]
        return Chan(perm.index(v.dim), v.segs)

    # -- dispatch -----------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.node = node
            self.order += 1
            self.env[node] = self.visit(node)
        self.node = None

    def visit(self, node: fx.Node) -> Value:
        if node.op == "placeholder":
            if "tensor_meta" not in node.meta:
                return META
            return Chan(None, ((self.axes.new(-1, boundary=True), 0, 1),))
        if node.op == "get_attr":
            if node.target in self.keys:
                return INV  # a parameter used as data; only allowed as a weight argument of a rule
            return INV if "tensor_meta" in node.meta else META
        if node.op == "output":
            for v in _leaves(node.args[0], self.env):
                if isinstance(v, Chan):
                    for i, _, _ in v.segs:
                        self.axes.boundary[i] = True
            return META
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            entry = _module_rule(mod)
            if entry is None:
                raise self.fail(f"unsupported op: {_op_name(node, mod)}; trace cannot tell how it moves channels")
            return entry.handler(self, node, mod)
        if node.op in ("call_function", "call_method"):
            table: Mapping[Any, _Entry] = FUNCTION_RULES if node.op == "call_function" else METHOD_RULES
            key = node.target if node.op == "call_function" else str(node.target)
            entry = table.get(key)
            if entry is None or not entry.params:
                self.check_no_param_data(node)
            if entry is None:
                raise self.unsupported(node)
            return entry.handler(self, node, None)
        raise self.fail(f"unsupported fx node kind {node.op}")

    def unsupported(self, node: fx.Node) -> TraceError:
        return self.fail(f"unsupported op: {_op_name(node)}; trace cannot tell how it moves channels")

    def check_no_param_data(self, node: fx.Node, allowed: tuple[Any, ...] = ()) -> None:
        """Refuse a parameter used as plain data (e.g. ``x * self.scale``): we cannot place it."""
        for a in _node_args(node):
            if a.op == "get_attr" and a.target in self.keys and a not in allowed:
                raise self.fail(f"parameter {a.target!r} is used by {_op_name(node)}, which trace does not understand")


def _node_args(node: fx.Node) -> Iterator[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return iter(out)


def _leaves(a: Any, env: Mapping[fx.Node, Value]) -> Iterator[Value]:
    out: list[Value] = []
    fx.node.map_arg(a, lambda n: out.append(env[n]) or n)
    return iter(out)
