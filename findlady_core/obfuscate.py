"""Structural obfuscation attacks: function-preserving transforms beyond permutations.

Each is seeded and keeps the model's function exactly (up to float rounding):

* ``split_neurons`` (NeuronSplit, Yan et al. 2023): a fraction of a layer's neurons copied, the
  copy taking outgoing weights ``a`` and the original ``w - a``;
* ``dummy_neurons`` (NeuronClique): ``n`` new neurons with equal incoming parameters whose
  outgoing weights sum to zero;
* ``scale_random``: every neuron's own parameters times ``c`` in [0.25, 4] (log-uniform), its
  consumers' weights times ``1 / c`` (a symmetry across ReLU / LeakyReLU: the attack assumes
  the groups it touches are such; limit it with ``--group``);
* ``scale_linear`` (``findlady_core.canon.scales``): any ``c != 0`` on linear paths, SwiGLU's
  up with down and a conv channel with its BatchNorm statistics;
* ``scale_norms`` (``findlady_core.canon.norms``): a pre-norm transformer's norm weights (and
  LayerNorm biases) times ``c != 0`` per channel, the readers' input columns times ``1 / c``;
* ``head_maps``: per (kv) head ``W_q -> A W_q``, ``W_k -> A^-T W_k``, ``W_v -> B W_v``,
  ``W_o -> W_o B^-1`` (biases with their weights), ``A`` and ``B`` orthogonal or general.

Width-changing attacks shuffle the widened group at random and record, per suspect position,
the reference neuron it came from (``-1`` for a dummy): ``Context.origins``, written to the
truth file. They run after the permutation (the spec's sizes are the reference's) and after
noise, quantization and pruning: obfuscation is the last step of a thief's pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from findlady_core.canon.headmaps import attention_layers
from findlady_core.canon.widths import _blocks, _unblocks, width_groups
from findlady_core.attack_steps import Context
from findlady_core.errors import InputError
from findlady_core.spec import Group, Spec, is_statistic

StateDict = Mapping[str, torch.Tensor]
SCALE_RANGE = (0.25, 4.0)


def _width(sd: StateDict, g: Group) -> int:
    m = g.members[0]
    return sd[m.tensor].shape[m.axis] // m.block


def _targets(sd: StateDict, spec: Spec, group: str | None) -> list[Group]:
    eligible = width_groups(spec)
    if group is not None:
        chosen = [g for g in eligible if g.name == group]
        if not chosen:
            raise InputError(f"group {group!r} is not a group whose width can change (it shares an axis or has a norm)")
        return chosen
    if not eligible:
        raise InputError("the spec has no group whose width can change")
    return eligible


def _widen(sd: dict[str, torch.Tensor], g: Group, n: int, extra_own: dict[str, torch.Tensor],
           extra_in: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Append neurons (their own and consumer blocks given per tensor), then shuffle the group;
    returns the shuffle ``q``: new position j holds old position ``q[j]``."""
    k = next(iter(extra_own.values())).shape[0]
    q = torch.randperm(n + k, generator=gen)
    for m in g.members:
        x = _blocks(sd[m.tensor], m, n)
        add = extra_own[m.tensor] if m.tensor in extra_own else extra_in[m.tensor]
        x = torch.cat([x, add.to(x.dtype)], 0).index_select(0, q)
        sd[m.tensor] = _unblocks(x, m)
    return q


def _origins(ctx: Context, g: Group, n: int) -> torch.Tensor:
    if g.name in ctx.origins:
        return ctx.origins[g.name]
    p = ctx.truth.get(g.name)
    return torch.argsort(p) if p is not None and p.numel() == n else torch.arange(n)  # position j holds reference argsort(p)[j]


def split_neurons(sd: StateDict, spec: Spec, fraction: float, *, group: str | None = None, seed: int = 0,
                  ctx: Context | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """NeuronSplit on every width group (or ``group``): ``ceil(fraction * n)`` neurons split."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise InputError(f"split fraction must be in (0, 1], got {fraction!r}")
    ctx = ctx or Context(spec)
    out = dict(sd)
    gen = torch.Generator().manual_seed(seed + 7001)
    for g in _targets(sd, spec, group):
        n = _width(out, g)
        k = max(1, math.ceil(fraction * n))
        pick = torch.randperm(n, generator=gen)[:k]
        own = {m.tensor: _blocks(out[m.tensor], m, n).index_select(0, pick).clone() for m in g.out_members}
        extra_in = {}
        for m in g.in_members:
            x = _blocks(out[m.tensor], m, n).clone()
            w = x.index_select(0, pick).double()
            a = w * torch.rand(w.shape, generator=gen, dtype=torch.float64) * 2  # any a works: w = a + (w - a)
            x[pick] = (w - a).to(x.dtype)
            out[m.tensor] = _unblocks(x, m)
            extra_in[m.tensor] = a
        origin = _origins(ctx, g, n)
        q = _widen(out, g, n, own, extra_in, gen)
        ctx.origins[g.name] = torch.cat([origin, origin[pick]])[q]
    return out


def dummy_neurons(sd: StateDict, spec: Spec, count: int, *, group: str | None = None, seed: int = 0,
                  ctx: Context | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """NeuronClique: ``count`` (>= 2) dummies per width group, equal incoming parameters drawn
    like the group's neurons, outgoing weights summing to zero."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise InputError(f"--dummy needs at least 2 neurons (their outgoing weights cancel), got {count!r}")
    ctx = ctx or Context(spec)
    out = dict(sd)
    gen = torch.Generator().manual_seed(seed + 7002)
    for g in _targets(sd, spec, group):
        n = _width(out, g)
        own = {}
        for m in g.out_members:
            x = _blocks(out[m.tensor], m, n).double()
            row = torch.randn(x.shape[1:], generator=gen, dtype=torch.float64) * x.std() + x.mean()
            if m.tensor.endswith("running_var"):
                row = row.abs() + 1e-3
            own[m.tensor] = row.expand(count, *row.shape).clone()
        extra_in = {}
        for m in g.in_members:
            x = _blocks(out[m.tensor], m, n).double()
            if is_statistic(m.tensor):
                extra_in[m.tensor] = torch.zeros(count, *x.shape[1:], dtype=torch.float64)
                continue
            c = torch.randn(count - 1, *x.shape[1:], generator=gen, dtype=torch.float64) * x.std()
            extra_in[m.tensor] = torch.cat([c, -c.sum(0, keepdim=True)], 0)
        origin = _origins(ctx, g, n)
        q = _widen(out, g, n, own, extra_in, gen)
        ctx.origins[g.name] = torch.cat([origin, torch.full((count,), -1, dtype=torch.int64)])[q]
    return out


def scale_random(sd: StateDict, spec: Spec, *, group: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every neuron of every width group (or ``group``) rescaled by its own random ``c``."""
    out = dict(sd)
    gen = torch.Generator().manual_seed(seed + 7003)
    lo, hi = (math.log(v) for v in SCALE_RANGE)
    for g in _targets(sd, spec, group):
        if any(is_statistic(m.tensor) for m in g.members):
            continue  # a BatchNorm channel rescales through its statistics: not this attack
        n = _width(out, g)
        c = torch.exp(torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo)
        for m in g.members:
            x = _blocks(out[m.tensor], m, n).double()
            f = (c if m.is_out else 1 / c).view(n, *([1] * (x.dim() - 1)))
            out[m.tensor] = _unblocks((x * f).to(out[m.tensor].dtype), m)
    return out


def _random_map(hd: int, kind: str, gen: torch.Generator, rotary_dim: int = 0) -> torch.Tensor:
    if rotary_dim:  # a rotation-scaling per frequency pair (i, i + rotary_dim/2): commutes with every rotary rotation
        h = rotary_dim // 2
        angle = torch.rand(h, generator=gen, dtype=torch.float64) * 2 * math.pi
        scale = torch.ones(h, dtype=torch.float64) if kind == "orthogonal" else \
            torch.exp(torch.rand(h, generator=gen, dtype=torch.float64) * 1.4 - 0.7)
        a, b = torch.diag(scale * torch.cos(angle)), torch.diag(scale * torch.sin(angle))
        rot = torch.cat([torch.cat([a, -b], 1), torch.cat([b, a], 1)], 0)
        # partial rotary: the dims it passes through take any map (never mixed with the rotated ones)
        return rot if rotary_dim == hd else torch.block_diag(rot, _random_map(hd - rotary_dim, kind, gen))
    q1, _ = torch.linalg.qr(torch.randn(hd, hd, generator=gen, dtype=torch.float64))
    if kind == "orthogonal":
        return q1
    q2, _ = torch.linalg.qr(torch.randn(hd, hd, generator=gen, dtype=torch.float64))
    s = torch.exp(torch.rand(hd, generator=gen, dtype=torch.float64) * 1.4 - 0.7)  # singular values in [0.5, 2]
    return q1 @ torch.diag(s) @ q2


def head_maps(sd: StateDict, spec: Spec, kind: str, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """An invertible map per kv head on q/k (``A``, ``A^-T``; shared by the query heads of a kv
    head; a rotation-scaling per rotary pair where the model has rotary embeddings; none where
    q/k dims are pinned otherwise) and on v/o (``B``, ``B^-1``)."""
    if kind not in ("orthogonal", "general"):
        raise InputError(f"--head-maps takes orthogonal or general, got {kind!r}")
    layers = attention_layers(spec)
    if not layers:
        raise InputError("the spec has no attention heads (a heads group with q, k, v and output members)")
    out = dict(sd)
    gen = torch.Generator().manual_seed(seed + 7004)
    for layer in layers:
        t = {name: out[name].double().clone() for name in layer.tensors}
        for g in range(layer.kv_heads):
            a = _random_map(layer.head_dim, kind, gen, rotary_dim=layer.rotary_dim if layer.qk == "rotary" else 0)
            b = _random_map(layer.head_dim, kind, gen)
            if layer.qk != "pinned":
                layer.map_qk(t, g, a)
            layer.map_vo(t, g, b)
        for name, x in t.items():
            out[name] = x.to(sd[name].dtype)
    return out
