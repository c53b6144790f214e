"""Attention layers read off a spec: where each head's q, k, v and output blocks sit.

A *heads group* permutes whole heads: its ``out`` members with ``block > 1`` are q, k and v (in
that order; weights of two or more axes, then biases), its one ``in`` weight is the output
projection. Three layouts occur and all read the same way here:

* the BERT catalog's: ``query``, ``key``, ``value`` weights (rows) and biases, ``output.dense``
  (columns), one head per element;
* derived specs of transformers classes with grouped-query attention (Llama, Mistral, Qwen2):
  the heads group permutes *kv heads*; q's (and o's) block is ``G`` query heads, the query heads
  sharing a kv head; the groups ``<heads>.group<g>`` permute those ``G`` heads inside kv head g;
* GPT-2's fused ``c_attn`` (a ``Conv1D``, weight ``in x out``): q, k, v are three members of one
  tensor at offsets ``0, E, 2E`` of axis 1, the output ``c_proj`` rows on axis 0.

Every block is handled as ``rows``: the head's slice moved to axis 0, ``head_dim x D`` (a bias
is a ``head_dim x 1`` column). The output projection's block is read the same way (its columns
become rows), so ``W_o -> W_o B^-1`` is ``o_rows -> B^-T o_rows``, the same shape of map as
``W_k -> A^-T W_k``.

**Which maps are symmetries** (``qk``): without rotary embeddings (the spec has groups
permuting every q/k dim inside a head) any invertible ``A`` (``general``); with rotary
embeddings only maps commuting with every rotary rotation (``rotary``): a 2x2 rotation-scaling
per frequency pair on the ``rotary_dim`` leading dims (the pairs ``(i, i + rotary_dim / 2)`` of
transformers' ``rotate_half``, known for the families in ``HALF_SPLIT_ROTARY``) and, under
partial rotary (Phi), any invertible map on the trailing dims rotary leaves alone, which the
derived spec lets groups permute; the two blocks never mix. With q/k dims pinned in any other
way or family (GPT-J's interleaved pairs), none (``pinned``: only v/o maps are looked for). v/o
never see the rotary rotation: always general ``B``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from findlady_core.spec import Group, Member, Spec

HALF_SPLIT_ROTARY = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi"})
"""Families whose transformers classes apply rotary embeddings to the leading ``rotary_dim``
q/k dims of a head in the ``rotate_half`` layout (pairs ``i, i + rotary_dim / 2``): every dim,
or under partial rotary (Phi's ``partial_rotary_factor``) a prefix, the rest passed through.
Others with pinned q/k dims (GPT-J's interleaved pairs) get no q/k maps: a wrong pairing would
not be a symmetry. (GPT-NeoX's fused per-head ``query_key_value`` is not read as a heads layout
at all.)"""


@dataclass(frozen=True)
class Slot:
    """Where head h's block of one tensor sits: ``axis``, from ``offset + h * block``."""

    tensor: str
    axis: int
    offset: int
    block: int

    def rows(self, sd: Mapping[str, torch.Tensor], h: int) -> torch.Tensor:
        x = sd[self.tensor].narrow(self.axis, self.offset + h * self.block, self.block).movedim(self.axis, 0)
        return x.reshape(self.block, -1).double()

    def put(self, sd: Mapping[str, torch.Tensor], h: int, rows: torch.Tensor) -> None:
        """Write ``rows`` into head h's block of ``sd[tensor]`` in place (``sd`` holds clones)."""
        view = sd[self.tensor].narrow(self.axis, self.offset + h * self.block, self.block).movedim(self.axis, 0)
        view.copy_(rows.reshape(view.shape).to(view.dtype))


@dataclass(frozen=True)
class AttentionLayer:
    heads_group: str
    kv_heads: int
    group_size: int  # query heads per kv head (1: multi-head attention)
    head_dim: int
    q: Slot
    k: Slot
    v: Slot
    o: Slot
    q_bias: Slot | None
    k_bias: Slot | None
    v_bias: Slot | None
    qk: str  # "general", "rotary" or "pinned" (module docstring)
    query_groups: tuple[str | None, ...]  # per kv head, the group permuting its query heads
    rotary_dim: int = 0  # under ``rotary``: the leading q/k dims it rotates (head_dim unless partial)

    @property
    def tensors(self) -> list[str]:
        slots = (self.q, self.k, self.v, self.o, self.q_bias, self.k_bias, self.v_bias)
        return sorted({s.tensor for s in slots if s is not None})

    def query_heads(self, g: int) -> range:
        return range(g * self.group_size, (g + 1) * self.group_size)

    def _aug(self, sd: Mapping[str, torch.Tensor], w: Slot, b: Slot | None, h: int) -> torch.Tensor:
        x = w.rows(sd, h)
        return torch.cat([x, b.rows(sd, h)], 1) if b is not None else x

    def q_rows(self, sd: Mapping[str, torch.Tensor], h: int) -> torch.Tensor:
        """Query head h's weights (and bias as one more column): ``head_dim x (D + 1)``."""
        return self._aug(sd, self.q, self.q_bias, h)

    def k_rows(self, sd: Mapping[str, torch.Tensor], g: int) -> torch.Tensor:
        return self._aug(sd, self.k, self.k_bias, g)

    def v_rows(self, sd: Mapping[str, torch.Tensor], g: int) -> torch.Tensor:
        return self._aug(sd, self.v, self.v_bias, g)

    def o_rows(self, sd: Mapping[str, torch.Tensor], h: int) -> torch.Tensor:
        return self.o.rows(sd, h)

    def map_qk(self, sd: Mapping[str, torch.Tensor], g: int, a: torch.Tensor) -> None:
        """In place: the query heads of kv head g ``-> A q``, kv head g's k ``-> A^-T k``."""
        a_it = torch.linalg.inv(a).T
        for h in self.query_heads(g):
            for s in (self.q, self.q_bias):
                if s is not None:
                    s.put(sd, h, a @ s.rows(sd, h))
        for s in (self.k, self.k_bias):
            if s is not None:
                s.put(sd, g, a_it @ s.rows(sd, g))

    def map_vo(self, sd: Mapping[str, torch.Tensor], g: int, b: torch.Tensor) -> None:
        """In place: kv head g's v ``-> B v``, the output columns of its query heads ``-> W_o B^-1``."""
        b_it = torch.linalg.inv(b).T
        for s in (self.v, self.v_bias):
            if s is not None:
                s.put(sd, g, b @ s.rows(sd, g))
        for h in self.query_heads(g):
            self.o.put(sd, h, b_it @ self.o.rows(sd, h))


def _slot(m: Member, head_dim: int) -> Slot:
    return Slot(m.tensor, m.axis, m.offset, head_dim)


def _qk_kind(spec: Spec, q: Member, hd: int) -> tuple[str, int]:
    """``(qk, rotary_dim)``: ``general`` when groups permute every q dim of the first query head
    (nothing pins them); ``rotary`` with the pinned leading dims when the family rotates them in
    the ``rotate_half`` layout and groups permute exactly the dims after them; else ``pinned``."""
    lo, hi = q.offset, q.offset + hd
    free: set[int] = set()
    for g in spec.groups:
        for m in g.members:
            if g.size > 1 and m.tensor == q.tensor and m.axis == q.axis and m.block == 1 and lo <= m.offset < hi:
                free.update(range(m.offset - lo, min(hi, m.offset + g.size) - lo))
    if len(free) == hd:
        return "general", 0
    family = str(spec.meta.get("family", "")) if isinstance(spec.meta, Mapping) else ""
    rd = hd - len(free)
    if family in HALF_SPLIT_ROTARY and rd % 2 == 0 and free == set(range(rd, hd)):
        return "rotary", rd
    return "pinned", 0


def attention_layers(spec: Spec) -> list[AttentionLayer]:
    """Every heads group laid out as the module docstring says; other groups are skipped."""
    out = []
    for g in spec.groups:
        blocks = [m for m in g.members if m.block > 1]
        if len(blocks) != len(g.members):
            continue
        outs = [m for m in blocks if m.is_out]
        ins = [m for m in blocks if not m.is_out]
        weights = [m for m in outs if not _is_bias(m)]
        biases = [m for m in outs if _is_bias(m)]
        if len(weights) != 3 or len(ins) != 1 or len(biases) not in (0, 3):
            continue
        q, k, v = weights
        if k.block != v.block or q.block % k.block or ins[0].block != q.block:
            continue
        hd = k.block
        G = q.block // hd
        qb, kb, vb = biases or (None, None, None)
        if biases and (qb.block != q.block or kb.block != hd or vb.block != hd):
            continue
        layer_groups = _query_groups(spec, g, q, hd, G)
        qk, rotary_dim = _qk_kind(spec, q, hd)
        out.append(AttentionLayer(
            g.name, g.size, G, hd, _slot(q, hd), _slot(k, hd), _slot(v, hd), _slot(ins[0], hd),
            None if qb is None else _slot(qb, hd), None if kb is None else _slot(kb, hd),
            None if vb is None else _slot(vb, hd), qk, layer_groups, rotary_dim))
    return out


_BIAS = re.compile(r"(^|\.)(bias|beta)$")


def _is_bias(m: Member) -> bool:
    return bool(_BIAS.search(m.tensor))


def _query_groups(spec: Spec, heads: Group, q: Member, hd: int, G: int) -> tuple[str | None, ...]:
    """Per kv head g, the group permuting its ``G`` query heads (q at ``offset + g * G * hd``,
    block ``hd``), or None (multi-head attention, or a spec without such groups)."""
    found: list[str | None] = [None] * heads.size
    if G == 1:
        return tuple(found)
    for sub in spec.groups:
        if sub.size != G:
            continue
        for m in sub.members:
            if m.tensor == q.tensor and m.axis == q.axis and m.block == hd:
                rel = m.offset - q.offset
                if rel % (G * hd) == 0 and 0 <= rel // (G * hd) < heads.size:
                    found[rel // (G * hd)] = sub.name
    return tuple(found)
