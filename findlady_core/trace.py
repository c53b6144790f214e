"""Trace a permutation spec from a ``torch.nn.Module`` (DESIGN.md section 3).

The module is traced with ``torch.fx`` and its shapes propagated on an example input. Every
tensor value gets a *channel layout*: which dimension holds its features and which "axis ids"
those features belong to. A Linear/Conv output creates a new axis id; channel-preserving ops
(activations, pooling, norms, depthwise convs, flattening) pass ids on; residual adds and gates
tie ids with a union-find. Each union-find class that touches neither the network's input nor
its output becomes one group. An op we do not understand fails loudly (``TraceError``) rather
than producing a spec that silently breaks the model, and every traced spec is self-checked by
permuting every group at random and comparing the module's outputs.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from findlady_core.errors import TraceError
from findlady_core.permute import apply_permutations, random_permutations
from findlady_core.spec import Group, Member, Spec

TOLERANCE = 1e-5

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
# Op tables. Anything not listed here is refused with a TraceError naming the op and the node.

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip
# Modules acting on the trailing k dims (spatial): the channel dim must lie before them.
_SPATIAL_MODULES: dict[type, int] = {}
for _k, _names in {
    1: ("MaxPool1d", "AvgPool1d", "AdaptiveAvgPool1d", "AdaptiveMaxPool1d", "LPPool1d", "ZeroPad1d",
        "ConstantPad1d", "ReflectionPad1d", "ReplicationPad1d", "CircularPad1d"),
    2: ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "LPPool2d", "ZeroPad2d",
        "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d", "CircularPad2d", "UpsamplingNearest2d",
        "UpsamplingBilinear2d"),
    3: ("MaxPool3d", "AvgPool3d", "AdaptiveAvgPool3d", "AdaptiveMaxPool3d", "ZeroPad3d", "ConstantPad3d",
        "ReflectionPad3d", "ReplicationPad3d", "CircularPad3d"),
}.items():  # fmt: skip
    for _n in _names:
        if hasattr(nn, _n):
            _SPATIAL_MODULES[getattr(nn, _n)] = _k

_ELEMENTWISE_FUNCTIONS: set[Any] = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh,
    F.softsign, F.logsigmoid, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.exp, torch.abs, torch.neg,
    torch.sqrt, torch.square, torch.clamp, torch.clip, operator.neg, operator.pos,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "square",
    "clamp", "clamp_", "clip", "softmax", "log_softmax", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type_as",
}  # fmt: skip
_BINARY_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
# Pure integer arithmetic on sizes (e.g. ``x.size(0) * 2``) is fine; these never touch tensors.
_META_FUNCTIONS: set[Any] = {operator.floordiv, operator.mod, operator.pow}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS: set[Any] = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_REDUCE_FUNCTIONS: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
_SPATIAL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
}  # fmt: skip
_CONV_FUNCTIONS: dict[Any, int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _op_name(node: fx.Node, module: nn.Module | None = None) -> str:
    if node.op == "call_module" and module is not None:
        return f"module {type(module).__module__}.{type(module).__qualname__} ({node.target})"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    return f"function {mod + '.' if mod else ''}{name}"


class _Walker:
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

    # -- rules --------------------------------------------------------------------------------

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
                return INV  # a parameter used as data; only allowed as a weight argument below
            return INV if "tensor_meta" in node.meta else META
        if node.op == "output":
            for v in _leaves(node.args[0], self.env):
                if isinstance(v, Chan):
                    for i, _, _ in v.segs:
                        self.axes.boundary[i] = True
            return META
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)])
        if node.op == "call_function":
            return self.visit_function(node)
        if node.op == "call_method":
            return self.visit_method(node)
        raise self.fail(f"unsupported fx node kind {node.op}")

    def check_no_param_data(self, node: fx.Node, allowed: tuple[Any, ...] = ()) -> None:
        """Refuse a parameter used as plain data (e.g. ``x * self.scale``): we cannot place it."""
        for a in _node_args(node):
            if a.op == "get_attr" and a.target in self.keys and a not in allowed:
                raise self.fail(f"parameter {a.target!r} is used by {_op_name(node)}, which trace does not understand")

    def visit_module(self, node: fx.Node, mod: nn.Module) -> Value:
        name = str(node.target)
        x = node.args[0] if node.args else None
        p = lambda attr: f"{name}.{attr}" if getattr(mod, attr, None) is not None else None  # noqa: E731
        if isinstance(mod, nn.Linear):
            return self.linear(x, name, f"{name}.weight", p("bias"), mod.out_features)
        if isinstance(mod, _CONV_MODULES):
            k = len(mod.kernel_size)
            return self.conv(x, name, f"{name}.weight", p("bias"), mod.groups, k)
        if isinstance(mod, _CONVT_MODULES):
            k = len(mod.kernel_size)
            return self.conv(x, name, f"{name}.weight", p("bias"), mod.groups, k, transposed=True)
        if isinstance(mod, _BN_MODULES):
            what = type(mod).__name__
            # BatchNorm wants a batch; InstanceNorm also takes unbatched (C, *spatial) input.
            dim = 1 if isinstance(mod, nn.modules.batchnorm._BatchNorm) else len(self.shape(x)) - int(what[-2]) - 1
            params = [p("weight"), p("bias"), p("running_mean"), p("running_var")]
            return self.norm(x, params, dim, what)
        if isinstance(mod, nn.LayerNorm):
            return self.layer_norm(x, tuple(mod.normalized_shape), p("weight"), p("bias"))
        if isinstance(mod, nn.GroupNorm):
            if mod.num_groups not in (1, mod.num_channels):
                raise self.fail(f"GroupNorm {name!r} with {mod.num_groups} groups of channels is not supported")
            return self.norm(x, [p("weight"), p("bias")], 1, "GroupNorm")
        if isinstance(mod, nn.PReLU):
            if mod.weight.numel() == 1:
                return self.tensor_arg(x, "PReLU input")
            return self.norm(x, [p("weight")], 1, "PReLU")
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return self.tensor_arg(x, type(mod).__name__)
        if type(mod) in _SPATIAL_MODULES:
            return self.spatial(x, _SPATIAL_MODULES[type(mod)], type(mod).__name__)
        if isinstance(mod, nn.Upsample):
            return self.spatial(x, len(self.shape(x)) - 2, "Upsample")
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self.reshape(x, self.shape(node))
        raise self.fail(f"unsupported op: {_op_name(node, mod)}; trace cannot tell how it moves channels")

    def visit_function(self, node: fx.Node) -> Value:
        f, args, kw = node.target, node.args, node.kwargs
        arg = lambda i, key, default=None: args[i] if len(args) > i else kw.get(key, default)  # noqa: E731
        if f in _CONV_FUNCTIONS or f is F.linear:
            w, b = arg(1, "weight"), arg(2, "bias")
            self.check_no_param_data(node, (w, b))
            weight = self.param_name(w, f"the weight of {node.name}")
            assert weight is not None
            bias = self.param_name(b, f"the bias of {node.name}")
            name = weight[: -len(".weight")] if weight.endswith(".weight") else weight
            if f is F.linear:
                return self.linear(args[0], name, weight, bias, self.shapes[weight][0])
            groups = int(arg(6, "groups", 1))
            return self.conv(args[0], name, weight, bias, groups, _CONV_FUNCTIONS[f])
        if f is F.batch_norm:
            ps = [arg(i, k) for i, k in ((3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var"))]
            self.check_no_param_data(node, tuple(ps))
            names = [self.param_name(a, f"a batch-norm tensor of {node.name}") for a in ps]
            return self.norm(args[0], names, 1, "batch_norm")
        if f is F.layer_norm:
            w, b = arg(2, "weight"), arg(3, "bias")
            self.check_no_param_data(node, (w, b))
            ns = arg(1, "normalized_shape")
            ns = (ns,) if isinstance(ns, int) else tuple(ns)
            return self.layer_norm(args[0], ns, self.param_name(w, "layer-norm weight"), self.param_name(b, "layer-norm bias"))
        self.check_no_param_data(node)
        if f in _ELEMENTWISE_FUNCTIONS:
            return self.tensor_arg(args[0], _op_name(node))
        if f in _BINARY_FUNCTIONS:
            return self.binary(args[0], arg(1, "other"))
        if f in _META_FUNCTIONS and all(isinstance(self.value(a), _Meta) for a in args):
            return META
        if f is operator.getitem:
            if isinstance(self.value(args[0]), _Meta):
                return META
            raise self.fail("indexing a tensor (x[...]) is not supported; trace cannot follow channel slices")
        if f is getattr:
            if args[1] in _META_ATTRS:
                return META
            raise self.fail(f"tensor attribute {args[1]!r} is not supported")
        if f in _RESHAPE_FUNCTIONS:
            return self.reshape(args[0], self.shape(node))
        if f in _REDUCE_FUNCTIONS:
            return self.reduce(args[0], arg(1, "dim"), bool(arg(2, "keepdim", False)))
        if f in _SPATIAL_FUNCTIONS:
            return self.spatial(args[0], _SPATIAL_FUNCTIONS[f], _op_name(node))
        if f is F.pad:
            return self.spatial(args[0], len(arg(1, "pad")) // 2, "F.pad")
        if f is F.interpolate:
            return self.spatial(args[0], len(self.shape(args[0])) - 2, "F.interpolate")
        if f in (torch.cat, torch.concat):
            return self.cat(arg(0, "tensors"), int(arg(1, "dim", 0)))
        if f in (torch.transpose, torch.permute):
            return self.move_dims(node, "transpose" if f is torch.transpose else "permute")
        raise self.fail(f"unsupported op: {_op_name(node)}; trace cannot tell how it moves channels")

    def visit_method(self, node: fx.Node) -> Value:
        m, args, kw = str(node.target), node.args, node.kwargs
        self.check_no_param_data(node)
        if m in ("size", "dim", "numel"):
            return META
        if m in _ELEMENTWISE_METHODS:
            return self.tensor_arg(args[0], f"Tensor.{m}")
        if m in _BINARY_METHODS:
            return self.binary(args[0], args[1] if len(args) > 1 else kw["other"])
        if m in _RESHAPE_METHODS:
            return self.reshape(args[0], self.shape(node))
        if m in _REDUCE_METHODS:
            dims = args[1] if len(args) > 1 else kw.get("dim")
            keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
            return self.reduce(args[0], dims, bool(keep))
        if m in ("transpose", "permute"):
            return self.move_dims(node, m)
        raise self.fail(f"unsupported op: {_op_name(node)}; trace cannot tell how it moves channels")

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


def _node_args(node: fx.Node) -> Iterator[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return iter(out)


def _leaves(a: Any, env: Mapping[fx.Node, Value]) -> Iterator[Value]:
    out: list[Value] = []
    fx.node.map_arg(a, lambda n: out.append(env[n]) or n)
    return iter(out)


# ---------------------------------------------------------------------------------------------


def _as_tuple(example_input: Tensor | tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


class _eval_mode:
    """Put a module in eval mode for a while, then restore every submodule's own flag."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def _tied(module: nn.Module) -> dict[str, list[str]]:
    """Every parameter/buffer name that shares its tensor with another name -> all its names."""
    by_id: dict[int, list[str]] = {}
    for n, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(n)
    return {n: names for names in by_id.values() if len(names) > 1 for n in names}


def trace_spec(module: nn.Module, example_input: Tensor | tuple[Any, ...], *, check: bool = True, seed: int = 0) -> Spec:
    """The permutation spec of ``module``, traced with torch.fx on ``example_input``.

    Groups are union-find classes of channel axes that touch neither the input nor the output,
    named after their first producing layer and listed in graph order (groups of one channel
    are left out: nothing to permute). With ``check`` the spec is self-checked
    (``check_spec``). Raises ``TraceError`` on untraceable modules, unknown ops, shared layers
    and tied weights.
    """
    inputs = _as_tuple(example_input)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    with _eval_mode(module):  # trace the inference graph (no drop-connect, no batch statistics)
        try:  # a plain run first: its error is clearer than the same one from inside fx
            with torch.no_grad():
                module(*inputs)
        except Exception as e:
            raise TraceError(f"running {type(module).__name__} on the example input failed: {type(e).__name__}: {e}") from None
        try:
            gm = fx.symbolic_trace(module)
        except Exception as e:  # fx raises many kinds (TraceError from control flow, TypeError...)
            raise TraceError(f"torch.fx cannot trace {type(module).__name__}: {type(e).__name__}: {e}") from None
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
        except Exception as e:
            raise TraceError(f"running {type(module).__name__} on the example input failed: {type(e).__name__}: {e}") from None
    walker = _Walker(gm, shapes)
    walker.run()
    spec = _assemble(walker.axes, type(module).__name__)
    tied = _tied(module)
    for t in sorted(spec.tensors):
        if t in tied:
            raise TraceError(f"tied weights: {' and '.join(tied[t])} are one tensor; a spec cannot permute them apart")
    if not spec.groups:
        raise TraceError(f"{type(module).__name__} has no permutable channels between its input and output")
    if check:
        check_spec(module, spec, example_input, seed=seed)
    return spec


def _assemble(axes: _Axes, module_name: str) -> Spec:
    classes: dict[int, list[int]] = {}
    for i in range(len(axes.parent)):
        classes.setdefault(axes.find(i), []).append(i)
    found = []
    for root, ids in classes.items():
        if axes.boundary[root] or axes.size[root] <= 1:
            continue
        producers = sorted(p for i in ids if (p := axes.producer[i]) is not None)
        members = sorted(
            (m for i in ids for m in axes.members[i]),
            key=lambda m: (0 if Member(m.tensor, m.axis, role=m.role).is_out else 1, m.order, m.seq),
        )
        if not producers or not members:
            continue
        order, name = producers[0]
        group = Group(name, axes.size[root], tuple(Member(m.tensor, m.axis, m.offset, m.block, m.role) for m in members))
        found.append((order, group))
    found.sort(key=lambda t: t[0])
    return Spec(tuple(g for _, g in found), {"source": "trace", "module": module_name})


def _outputs(module: nn.Module, inputs: tuple[Any, ...]) -> list[Tensor]:
    with _eval_mode(module), torch.no_grad():
        out = module(*inputs)
    flat: list[Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            flat.append(o.detach())
        elif isinstance(o, Mapping):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(out)
    return flat


def relative_error(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest ``max|a-b| / max|a|`` over matching output tensors."""
    err = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = x.double(), y.double()
        scale = float(x.abs().max()) if x.numel() else 0.0
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        err = max(err, diff / max(scale, 1e-30))
    return err


def check_spec(
    module: nn.Module,
    spec: Spec,
    example_input: Tensor | tuple[Any, ...],
    *,
    seed: int = 0,
    tolerance: float = TOLERANCE,
    groups: list[str] | None = None,
) -> float:
    """Permute every group (or ``groups``) at random, load the result into a copy of ``module``
    and compare its outputs on ``example_input`` with the original's (eval mode).

    Returns the relative max error; raises ``TraceError`` naming the guilty groups when it
    exceeds ``tolerance``. This is the proof that a spec is function-preserving for the module.
    """
    inputs = _as_tuple(example_input)
    state = module.state_dict()
    spec.validate(state)
    reference = _outputs(module, inputs)

    def error(names: list[str] | None) -> float:
        perms = random_permutations(spec, names, seed=seed)
        twin = copy.deepcopy(module)
        twin.load_state_dict(apply_permutations(state, spec, perms), strict=True)
        return relative_error(reference, _outputs(twin, inputs))

    err = error(groups)
    if err > tolerance:
        bad = [g for g in (groups or spec.names) if error([g]) > tolerance]
        raise TraceError(
            f"traced spec is not function-preserving: relative max error {err:.3g} > {tolerance:g} "
            f"after permuting the groups; groups that break it alone: {', '.join(bad[:10]) or 'none (only together)'}"
        )
    return err


__all__ = ["trace_spec", "check_spec", "relative_error", "TOLERANCE"]
