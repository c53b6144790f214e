"""One rule per aten op: how the op joins, refines or pins the axes of its operands.

A rule reads its operands' layouts (``graph.Walker.lay``) and returns the output's. A case it
does not handle exactly raises ``unsupported(...)``: the walker then pins every axis the op
touches and records why, so the derived spec stays exact.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from findlady_core.derive.graph import FREE, META, Dep, Entry, Layout, Walker, _Free, align, rule, unsupported


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _shift(lay: Layout, mapping: dict[int, int]) -> Layout:
    """Renumber the Dep references of ``lay`` (old dim -> new dim); unmapped ones are refused."""
    out: list[Entry] = []
    for e in lay:
        if isinstance(e, Dep):
            if e.dim not in mapping:
                raise unsupported("moves the heads a dim depends on")
            e = Dep(mapping[e.dim], e.kids)
        out.append(e)
    return tuple(out)


# --- pass-through and elementwise ----------------------------------------------------------

_UNARY = """relu relu_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ neg exp log sqrt rsqrt abs erf
hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ hardswish hardswish_ hardsigmoid mish softplus
dropout clone contiguous alias detach to _to_copy type_as lift_fresh_copy reciprocal sin cos square
sign logical_not relu6 celu selu gelu_tanh dropout_ clamp_ tanh_ exp_ neg_ mish_""".split()


@rule(*[f"aten::{n}" for n in _UNARY])
def unary(w: Walker, node: fx.Node) -> Layout:
    return w.lay(node.args[0])


@rule("aten::pow", "aten::clamp", "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::mul", "aten::mul_",
      "aten::div", "aten::div_", "aten::rsub", "aten::where", "aten::masked_fill", "aten::masked_fill_",
      "aten::maximum", "aten::minimum", "aten::eq", "aten::ne", "aten::lt", "aten::le", "aten::gt", "aten::ge",
      "aten::__and__", "aten::__or__", "aten::logical_and", "aten::logical_or", "aten::bitwise_and",
      "aten::bitwise_or", "aten::fmod", "aten::remainder", "aten::floor_divide", "aten::copy_", "aten::lerp")
def elementwise(w: Walker, node: fx.Node) -> Layout:
    """Elementwise with broadcasting: operands' matching dimensions take one permutation."""
    ts = [a for a in node.args if isinstance(a, fx.Node) and isinstance(w.env.get(a), tuple)]
    return w.broadcast([w.lay(a) for a in ts], [w.shape(a) for a in ts], w.shape(node))


@rule("aten::softmax", "aten::_softmax", "aten::log_softmax", "aten::_log_softmax")
def softmax(w: Walker, node: fx.Node) -> Layout:
    return w.lay(node.args[0])  # equivariant along its dim, elementwise along the others


@rule("aten::new_ones", "aten::new_zeros", "aten::new_full", "aten::new_empty", "aten::zeros_like",
      "aten::ones_like", "aten::full_like", "aten::empty_like")
def constant(w: Walker, node: fx.Node) -> Layout:
    return tuple(FREE for _ in w.shape(node))  # constant along every dimension


@rule("aten::_assert_tensor_metadata", "aten::_assert_async", "aten::sym_size", "aten::_assert_scalar",
      "aten::sym_constrain_range_for_size")
def meta(w: Walker, node: fx.Node) -> Any:
    return META


@rule("getitem")
def getitem(w: Walker, node: fx.Node) -> Any:
    v = w.env.get(node.args[0])
    if isinstance(v, list):
        return v[node.args[1]]
    raise unsupported("indexes a value that is not a list of tensors")


# --- reductions ----------------------------------------------------------------------------


@rule("aten::mean", "aten::sum", "aten::amax", "aten::amin", "aten::var", "aten::std", "aten::logsumexp",
      "aten::linalg_vector_norm", "aten::norm")
def reduce(w: Walker, node: fx.Node) -> Layout:
    """A sum, mean, max or norm over a dimension is invariant to any permutation of it."""
    x = w.lay(node.args[0])
    n = len(x)
    name = node.target._schema.name  # type: ignore[union-attr]
    dims = arg(node, 2, "dim") if name in ("aten::linalg_vector_norm", "aten::norm") else arg(node, 1, "dim")
    keep = arg(node, 3, "keepdim", False) if name in ("aten::linalg_vector_norm", "aten::norm") else arg(node, 2, "keepdim", False)
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not dims:
        dims = list(range(n))
        keep = len(w.shape(node)) == n
    red = {_dim(d, n) for d in dims}
    out: list[Entry] = []
    mapping: dict[int, int] = {}
    for i, e in enumerate(x):
        if i in red:
            if keep:
                mapping[i] = len(out)
                out.append(FREE)
            continue
        if isinstance(e, Dep) and e.dim in red:
            for k in e.kids[1:]:  # a sum over the heads mixes their dims: all take one permutation
                w.axes.union(e.kids[0], k)
            e = e.kids[0]
        mapping[i] = len(out)
        out.append(e)
    return _shift(tuple(out), mapping)


# --- products ------------------------------------------------------------------------------


@rule("aten::linear")
def linear(w: Walker, node: fx.Node) -> Layout:
    x, W = w.lay(node.args[0]), w.lay(node.args[1])
    b = arg(node, 2, "bias")
    w.tie(x[-1], W[1])
    w.role(W, 0, "out")
    w.role(W, 1, "in")
    if isinstance(b, fx.Node):
        w.tie(w.lay(b)[0], W[0])
    return x[:-1] + (W[0],)


@rule("aten::addmm")
def addmm(w: Walker, node: fx.Node) -> Layout:
    """``bias + x @ W`` with W stored [in, out]: GPT-2's Conv1D."""
    b, x, W = node.args[0], w.lay(node.args[1]), w.lay(node.args[2])
    w.tie(x[1], W[0])
    w.role(W, 0, "in")
    w.role(W, 1, "out")
    out = (x[0], W[1])
    return w.broadcast([out, w.lay(b)], [w.shape(node), w.shape(b)], w.shape(node))


@rule("aten::matmul", "aten::mm", "aten::bmm")
def matmul(w: Walker, node: fx.Node) -> Layout:
    a, b = node.args[0], node.args[1]
    sa, sb, so = w.shape(a), w.shape(b), w.shape(node)
    if len(sa) < 2 or len(sb) < 2:
        raise unsupported("matmul of a vector")
    n = len(so)
    A, B = align(w.lay(a), n), align(w.lay(b), n)
    pa, pb = (1,) * (n - len(sa)) + sa, (1,) * (n - len(sb)) + sb
    batch: list[Entry] = []
    for d in range(n - 2):
        ents = [lay[d] for lay, s in ((A, pa), (B, pb)) if s[d] != 1 and not isinstance(lay[d], _Free)]
        for e in ents[1:]:
            w.tie(ents[0], e)
        batch.append(ents[0] if ents else FREE)
    w.tie(A[n - 1], B[n - 2])  # the contracted dimension
    w.role(B, n - 2, "in")
    return tuple(batch) + (A[n - 2], B[n - 1])


@rule("aten::embedding")
def embedding(w: Walker, node: fx.Node) -> Layout:
    W, ids = w.lay(node.args[0]), w.lay(node.args[1])
    w.pin(W[0])  # rows are addressed by token ids
    w.role(W, 1, "out")
    return ids + (W[1],)


@rule("aten::scaled_dot_product_attention")
def sdpa(w: Walker, node: fx.Node) -> Layout:
    q, k, v = (node.args[i] for i in range(3))
    if arg(node, 7, "enable_gqa", False):
        raise unsupported("grouped-query attention inside one op")
    sq, sk, sv = w.shape(q), w.shape(k), w.shape(v)
    n = len(sq)
    Q, K, V = align(w.lay(q), n), align(w.lay(k), n), align(w.lay(v), n)
    for d in range(n - 2):
        ents = [lay[d] for lay, s in ((Q, sq), (K, sk), (V, sv)) if s[d - n + len(s)] != 1 and not isinstance(lay[d], _Free)]
        for e in ents[1:]:
            w.tie(ents[0], e)
    w.tie(Q[-1], K[-1])  # q.k contracts the dims inside a head
    w.tie(K[-2], V[-2])  # keys and values share the sequence
    mask = arg(node, 3, "attn_mask")
    out = Q[:-1] + (V[-1],)
    if isinstance(mask, fx.Node):
        scores = Q[:-1] + (K[-2],)
        w.broadcast([scores, w.lay(mask)], [sq[:-1] + sk[-2:-1], w.shape(mask)], sq[:-1] + sk[-2:-1])
    return out


# --- convolutions, norms, pooling ----------------------------------------------------------


@rule("aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution")
def conv(w: Walker, node: fx.Node) -> Layout:
    xs = node.args[0]
    x, W = w.lay(xs), w.lay(node.args[1])
    b = arg(node, 2, "bias")
    if node.target._schema.name == "aten::convolution":  # type: ignore[union-attr]
        transposed, groups = bool(arg(node, 6, "transposed")), int(arg(node, 8, "groups", 1))
    else:
        transposed, groups = False, int(arg(node, 6, "groups", 1))
    for e in x[2:]:
        w.pin(e, "a spatial axis feeds a convolution")
    for e in W[2:]:
        w.pin(e)  # kernel positions are no symmetry
    if transposed:
        if groups != 1:
            raise unsupported("grouped transposed convolution")
        w.tie(x[1], W[0])
        w.role(W, 0, "in")
        w.role(W, 1, "out")
        out_ch = W[1]
    else:
        w.role(W, 0, "out")
        w.role(W, 1, "in")
        out_ch = W[0]
        if groups == 1:
            w.tie(x[1], W[1])
        else:
            # Groups move as wholes (input and output together); inside a group, the output
            # channels permute freely and the input channels with the weight's columns, which
            # every group shares.
            if not isinstance(x[1], int) or not isinstance(W[0], int):
                raise unsupported("grouped convolution on a broadcast channel axis")
            si, so = w.axes.split(x[1], groups), w.axes.split(W[0], groups)
            if si is None or so is None:
                raise unsupported("grouped convolution on channels with another structure")
            w.axes.union(si[0], so[0])
            for kid in si[1]:
                w.tie(kid, W[1])
    if isinstance(b, fx.Node):
        w.tie(w.lay(b)[0], out_ch)
    return (x[0], out_ch) + w.fixed(w.shape(node)[2:], "spatial")


def _channel_params(w: Walker, x: Layout, params: list[Any]) -> None:
    for p in params:
        if isinstance(p, fx.Node):
            w.tie(w.lay(p)[0], x[1])
            w.role(w.lay(p), 0, "out")


@rule("aten::batch_norm", "aten::_native_batch_norm_legit_no_training", "aten::native_batch_norm",
      "aten::_native_batch_norm_legit", "aten::instance_norm")
def batch_norm(w: Walker, node: fx.Node) -> Any:
    x = w.lay(node.args[0])
    _channel_params(w, x, [arg(node, i, n) for i, n in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))])
    if isinstance(node.meta.get("val"), (list, tuple)):
        return [x] + [tuple(FREE for _ in v.shape) for v in node.meta["val"][1:]]
    return x


@rule("aten::layer_norm", "aten::native_layer_norm", "aten::rms_norm")
def layer_norm(w: Walker, node: fx.Node) -> Any:
    """Statistics over the last k dims are invariant to any permutation of them."""
    x = w.lay(node.args[0])
    k = len(node.args[1])
    for p in (arg(node, 2, "weight"), arg(node, 3, "bias") if node.target._schema.name != "aten::rms_norm" else None):  # type: ignore[union-attr]
        if isinstance(p, fx.Node):
            P = w.lay(p)
            for j in range(k):
                w.tie(P[j], x[len(x) - k + j])
                w.role(P, j, "out")
    if isinstance(node.meta.get("val"), (list, tuple)):
        return [x] + [x[: len(x) - k] + (FREE,) * k for _ in node.meta["val"][1:]]
    return x


@rule("aten::group_norm", "aten::native_group_norm")
def group_norm(w: Walker, node: fx.Node) -> Any:
    x = w.lay(node.args[0])
    native = node.target._schema.name == "aten::native_group_norm"  # type: ignore[union-attr]
    groups = int(node.args[6] if native else arg(node, 1, "num_groups"))
    params = [node.args[1], node.args[2]] if native else [arg(node, 2, "weight"), arg(node, 3, "bias")]
    for e in x[2:]:
        w.pin(e, "a spatial axis feeds a group norm")
    if groups > 1 and isinstance(x[1], int):
        if w.axes.split(x[1], groups) is None:  # channels move inside their group, groups as wholes
            raise unsupported("group norm on channels with another structure")
    _channel_params(w, x, params)
    if native:
        return [x] + [tuple(FREE for _ in v.shape) for v in node.meta["val"][1:]]
    return x


@rule("aten::max_pool1d", "aten::max_pool2d", "aten::max_pool3d", "aten::avg_pool1d", "aten::avg_pool2d",
      "aten::avg_pool3d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::adaptive_avg_pool3d",
      "aten::max_pool2d_with_indices", "aten::adaptive_max_pool2d")
def pool(w: Walker, node: fx.Node) -> Any:
    name = node.target._schema.name  # type: ignore[union-attr]
    k = int(next(c for c in name if c.isdigit()))
    x = w.lay(node.args[0])
    for e in x[-k:]:
        w.pin(e, "a spatial axis is pooled")
    val = node.meta["val"]
    first = val[0] if isinstance(val, (list, tuple)) else val
    out = x[:-k] + w.fixed(tuple(int(s) for s in first.shape[-k:]), "spatial")
    return [out, out] if isinstance(val, (list, tuple)) else out


@rule("aten::constant_pad_nd", "aten::pad")
def pad(w: Walker, node: fx.Node) -> Layout:
    x = w.lay(node.args[0])
    amounts = list(node.args[1])
    out = list(x)
    for j in range(len(amounts) // 2):
        d = len(x) - 1 - j
        if amounts[2 * j] or amounts[2 * j + 1]:
            if w.live_entry(x[d]):
                raise unsupported("pads a permuted axis")
            out[d] = w.fixed((w.shape(node)[d],), "padded")[0]
    return tuple(out)
