"""One rule per aten op: how the op joins, refines or pins the axes of its operands.

A rule reads its operands' layouts (``graph.Walker.lay``) and returns the output's. A case it
does not handle exactly raises ``unsupported(...)``: the walker then pins every axis the op
touches and records why, so the derived spec stays exact.
"""

from __future__ import annotations

import itertools
import math
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


# --- shapes --------------------------------------------------------------------------------


@rule("aten::view", "aten::reshape", "aten::_unsafe_view", "aten::flatten", "aten::unflatten")
def view(w: Walker, node: fx.Node) -> Layout:
    return reshape(w, w.lay(node.args[0]), w.shape(node.args[0]), w.shape(node))


def _factor_groups(si: tuple[int, ...], so: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Consecutive input and output dims with equal products (how a reshape regroups them)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(si) or j < len(so):
        if i < len(si) and si[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(so) and so[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(si) or j >= len(so):
            raise unsupported("reshape of an empty tensor")
        I, O, pi, po = [i], [j], si[i], so[j]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po and i < len(si):
                I.append(i)
                pi *= si[i]
                i += 1
            elif po < pi and j < len(so):
                O.append(j)
                po *= so[j]
                j += 1
            else:
                raise unsupported("reshape without matching sizes")
        groups.append((I, O))
    return groups


def reshape(w: Walker, x: Layout, si: tuple[int, ...], so: tuple[int, ...]) -> Layout:
    out: list[Entry] = [FREE] * len(so)
    groups = [(I, O, [d for d in I if si[d] != 1], [d for d in O if so[d] != 1]) for I, O in _factor_groups(si, so)]
    one_to_one = {I1[0]: O1[0] for _, _, I1, O1 in groups if len(I1) == 1 and len(O1) == 1}
    merged = {d: (I1, O1[0]) for _, _, I1, O1 in groups if len(I1) > 1 and len(O1) == 1 for d in I1}

    def follow(e: Entry) -> Entry:
        """Renumber a Dep whose heads dim moved: kept, or merged with the dims after it."""
        if not isinstance(e, Dep):
            return e
        if e.dim in one_to_one:
            return Dep(one_to_one[e.dim], e.kids)
        if e.dim in merged:
            I1, o = merged[e.dim]
            t = I1.index(e.dim)
            idx = itertools.product(*[range(si[d]) for d in I1])
            return Dep(o, tuple(e.kids[p[t]] for p in idx))
        raise unsupported("splits the heads a dim depends on")

    for _, _, I1, O1 in groups:
        if not O1:
            continue
        if len(I1) == 1 and len(O1) == 1:
            out[O1[0]] = follow(x[I1[0]])
        elif len(I1) == 1 and len(O1) == 2:
            e = x[I1[0]]
            if isinstance(e, _Free):
                continue
            if not isinstance(e, int):
                raise unsupported("splits the dims inside heads")
            parts = w.axes.split(e, so[O1[0]])
            if parts is None:
                raise unsupported("splits an axis that already has another structure")
            out[O1[0]], out[O1[1]] = parts[0], Dep(O1[0], tuple(parts[1]))
        elif len(O1) == 1:
            acc = x[I1[-1]]
            for d in reversed(I1[:-1]):
                acc = _merge(w, x[d], acc, si[d], math.prod(si[e] for e in I1[I1.index(d) + 1 :]), d)
            out[O1[0]] = acc
        else:
            raise unsupported("regroups several dims into several others")
    return tuple(out)


def _merge(w: Walker, outer: Entry, inner: Entry, n_outer: int, n_inner: int, outer_dim: int) -> Entry:
    """The entry of dims (outer, inner) flattened into one."""
    if not w.live_entry(outer) and not w.live_entry(inner):
        return FREE if isinstance(outer, _Free) and isinstance(inner, _Free) else w.fixed((n_outer * n_inner,), "merged")[0]
    if isinstance(outer, Dep):
        raise unsupported("merges dims inside heads with the dims after them")
    o = outer if isinstance(outer, int) else w.axes.new(n_outer, "broadcast")
    if isinstance(inner, Dep):
        if inner.dim != outer_dim:
            raise unsupported("merges dims whose heads lie elsewhere")
        kids = list(inner.kids)
    elif isinstance(inner, int):
        kids = [inner] * n_outer  # the same permutation inside every block (conv -> flatten)
    else:
        # broadcast copies (repeat_kv): each outer item's copies may permute on their own
        kids = [w.axes.new(n_inner, f"{w.axes.label[w.axes.find(o)]}.group{i}") for i in range(n_outer)]
    return w.axes.joined("prod", [o, *kids], w.axes.label[w.axes.find(o)])


@rule("aten::transpose", "aten::t", "aten::numpy_T", "aten::mT", "aten::permute", "aten::swapaxes", "aten::movedim")
def permute(w: Walker, node: fx.Node) -> Layout:
    x = w.lay(node.args[0])
    n = len(x)
    name = node.target._schema.name  # type: ignore[union-attr]
    order = list(range(n))
    if name == "aten::permute":
        order = [_dim(d, n) for d in node.args[1]]
    elif name in ("aten::t", "aten::numpy_T"):
        order = order[::-1]
    elif name == "aten::mT":
        order[-2], order[-1] = order[-1], order[-2]
    elif name == "aten::movedim":
        src, dst = node.args[1], node.args[2]
        src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
        shape = list(range(n))
        order = [None] * n  # type: ignore[list-item]
        for s, d in zip(src, dst):
            order[_dim(d, n)] = _dim(s, n)
        rest = iter(d for d in shape if d not in [_dim(s, n) for s in src])
        order = [o if o is not None else next(rest) for o in order]
    else:
        a, b = _dim(node.args[1], n), _dim(node.args[2], n)
        order[a], order[b] = order[b], order[a]
    inv = {old: new for new, old in enumerate(order)}
    return _shift(tuple(x[o] for o in order), inv)


@rule("aten::unsqueeze")
def unsqueeze(w: Walker, node: fx.Node) -> Layout:
    x = w.lay(node.args[0])
    d = _dim(node.args[1], len(x) + 1)
    mapping = {i: i + (i >= d) for i in range(len(x))}
    return _shift(x[:d] + (FREE,) + x[d:], mapping)


@rule("aten::squeeze", "aten::squeeze_")
def squeeze(w: Walker, node: fx.Node) -> Layout:
    x, s = w.lay(node.args[0]), w.shape(node.args[0])
    dims = arg(node, 1, "dim")
    if dims is None:
        drop = {i for i, n in enumerate(s) if n == 1}
    else:
        drop = {_dim(d, len(x)) for d in ([dims] if isinstance(dims, int) else dims) if s[_dim(d, len(x))] == 1}
    keep = [i for i in range(len(x)) if i not in drop]
    mapping = {old: new for new, old in enumerate(keep)}
    out = [e.kids[0] if isinstance(e, Dep) and e.dim in drop else e for e in (x[i] for i in keep)]
    return _shift(tuple(out), mapping)


@rule("aten::expand", "aten::expand_as", "aten::broadcast_to")
def expand(w: Walker, node: fx.Node) -> Layout:
    return align(w.lay(node.args[0]), len(w.shape(node)))  # new copies along size-1 dims are FREE


@rule("aten::select")
def select(w: Walker, node: fx.Node) -> Layout:
    x, s = w.lay(node.args[0]), w.shape(node.args[0])
    d = _dim(node.args[1], len(x))
    i = node.args[2] + s[d] if node.args[2] < 0 else node.args[2]
    _cut(w, x[d], i, i + 1)  # the chosen position cannot move
    keep = [j for j in range(len(x)) if j != d]
    out = [e.kids[i] if isinstance(e, Dep) and e.dim == d else e for e in (x[j] for j in keep)]
    return _shift(tuple(out), {old: new for new, old in enumerate(keep)})


def _cut(w: Walker, e: Entry, lo: int, hi: int) -> Entry:
    """The entry of elements [lo, hi) of a dimension, refining its axis into slices."""
    if isinstance(e, _Free):
        return e
    if isinstance(e, Dep):
        return Dep(e.dim, tuple(_cut(w, k, lo, hi) for k in e.kids))  # type: ignore[misc]
    pieces = w.axes.cut(e, lo, hi)
    if pieces is None:
        raise unsupported("slices through the items of a head split")
    return pieces[0] if len(pieces) == 1 else w.axes.joined("cat", pieces, w.axes.label[w.axes.find(e)])


def _slice(w: Walker, x: Layout, d: int, lo: int, hi: int) -> Layout:
    out = list(x)
    out[d] = _cut(w, x[d], lo, hi)
    out = [Dep(e.dim, e.kids[lo:hi]) if isinstance(e, Dep) and e.dim == d else e for e in out]
    return tuple(out)


@rule("aten::slice")
def slice_(w: Walker, node: fx.Node) -> Layout:
    x, s = w.lay(node.args[0]), w.shape(node.args[0])
    d = _dim(arg(node, 1, "dim", 0), len(x))
    n = s[d]
    lo, hi, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    lo = 0 if lo is None else (lo + n if lo < 0 else lo)
    hi = n if hi is None else (hi + n if hi < 0 else hi)
    lo, hi = max(0, min(lo, n)), max(0, min(hi, n))
    if step != 1:
        if w.live_entry(x[d]):
            raise unsupported("strided slice of a permuted axis")
        out = list(x)
        out[d] = w.fixed((w.shape(node)[d],), "sliced")[0]
        return tuple(out)
    return _slice(w, x, d, lo, hi)


@rule("aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::tensor_split")
def split(w: Walker, node: fx.Node) -> list[Layout]:
    x = w.lay(node.args[0])
    name = node.target._schema.name  # type: ignore[union-attr]
    d = _dim(arg(node, 1 if name == "aten::unbind" else 2, "dim", 0), len(x))
    outs = node.meta["val"]
    if name == "aten::unbind":
        return [select_index(w, x, d, i) for i in range(len(outs))]
    if name == "aten::tensor_split":
        raise unsupported("tensor_split")
    res, lo = [], 0
    for v in outs:
        n = int(v.shape[d])
        res.append(_slice(w, x, d, lo, lo + n))
        lo += n
    return res


def select_index(w: Walker, x: Layout, d: int, i: int) -> Layout:
    _cut(w, x[d], i, i + 1)
    keep = [j for j in range(len(x)) if j != d]
    out = [e.kids[i] if isinstance(e, Dep) and e.dim == d else e for e in (x[j] for j in keep)]
    return _shift(tuple(out), {old: new for new, old in enumerate(keep)})


@rule("aten::cat", "aten::concat", "aten::concatenate")
def cat(w: Walker, node: fx.Node) -> Layout:
    ts = list(node.args[0])
    shapes = [w.shape(t) for t in ts]
    lays = [w.lay(t) for t in ts]
    n = len(w.shape(node))
    d = _dim(arg(node, 1, "dim", 0), n)
    out: list[Entry] = []
    for j in range(n):
        if j == d:
            out.append(FREE)
            continue
        ents = [lay[j] for lay, s in zip(lays, shapes) if s[j] != 1 and not isinstance(lay[j], _Free)]
        for e in ents[1:]:
            w.tie(ents[0], e)
        out.append(ents[0] if ents else FREE)
    if any(isinstance(e, Dep) and e.dim == d for e in out):
        raise unsupported("concatenates along the heads a dim depends on")
    if any(isinstance(lay[d], Dep) for lay in lays):
        # pieces of the dims inside each head (rotate_half): joined head by head
        deps = [lay[d] for lay in lays]
        if not all(isinstance(e, Dep) and e.dim == deps[0].dim and len(e.kids) == len(deps[0].kids) for e in deps):  # type: ignore[union-attr]
            raise unsupported("concatenates dims inside heads with other tensors")
        kids = tuple(w.axes.joined("cat", [e.kids[i] for e in deps], "cat") for i in range(len(deps[0].kids)))  # type: ignore[union-attr]
        out[d] = Dep(deps[0].dim, kids)  # type: ignore[union-attr]
        return tuple(out)
    parts: list[int] = []
    for lay, s in zip(lays, shapes):
        e = lay[d]
        parts.append(e if isinstance(e, int) else w.axes.new(s[d], "broadcast"))
    if not any(w.axes.live(p) for p in parts):
        out[d] = w.fixed((w.shape(node)[d],), "concatenated")[0]
    else:
        out[d] = w.axes.joined("cat", parts, "cat")
    return tuple(out)


@rule("aten::index")
def index(w: Walker, node: fx.Node) -> Layout:
    """``x[i0, i1, ...]`` with index tensors on the leading dims: those are read by position."""
    x = w.lay(node.args[0])
    idx = list(node.args[1])
    if any(i is None for i in idx):
        raise unsupported("advanced indexing with skipped dims")
    for e in x[: len(idx)]:
        w.pin(e, "indexed by position")
    k = len(w.shape(node)) - (len(x) - len(idx))
    lead = w.fixed(w.shape(node)[:k], "indexed")
    mapping = {len(idx) + j: k + j for j in range(len(x) - len(idx))}
    return lead + _shift(x[len(idx):], mapping)
