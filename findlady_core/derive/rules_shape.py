"""Rules of the shape ops: reshapes (the head split), transposes, slicing and concatenation.

A reshape that splits one axis into two refines it as heads x dims-inside-heads; a slice
refines it into pieces (a fused q|k|v projection, rotary halves); a concatenation joins pieces.
"""

from __future__ import annotations

import itertools
import math

import torch.fx as fx

from findlady_core.derive.graph import FREE, Dep, Entry, Layout, Walker, _Free, align, rule, unsupported
from findlady_core.derive.rules import _dim, _shift, arg



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
