"""The BERT family: a built-in permutation spec for encoders that cannot be traced.

BERT-style encoders (Hugging Face tensor names) are recognized from their state dict keys, with
or without a prefix (``bert.``, ``0.auto_model.``...). The spec has four kinds of groups, in the
order they must apply (outer before inner, paper section 2 on attention):

1. ``residual``: the hidden stream every layer reads and writes (residual adds and LayerNorm,
   which is permutation-equivariant, tie all of them together);
2. ``encoder.layer.{i}.mlp``: each layer's feed-forward neurons;
3. ``encoder.layer.{i}.attention.heads``: which head sits where (block = head_dim);
4. ``encoder.layer.{i}.attention.head{h}.qk`` / ``.vo``: the dims inside one head, q with k
   (their dot product is invariant) and v with the attention output's input columns;
5. ``pooler``: the pooler's hidden neurons, when a task head reads them (a sequence classifier,
   next-sentence prediction); without such a reader the pooler's output is the model's output
   and stays in place.

Heads (3 and 4) need the head count, which the weights do not show: from the config
(``num_attention_heads``) or the caller. The residual permutation also permutes the encoder's
output hidden states; a task head reading them per token (token classification, question
answering: no pooler) is permuted on its inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from findlady_core.errors import SpecError
from findlady_core.families import family
from findlady_core.spec import Group, Member, Spec

_WORD = "embeddings.word_embeddings.weight"
_Q = "attention.self.query.weight"

# Heads of known BERT widths whose head_dim is not the usual 64 (MiniLM: 384 = 12 x 32).
_KNOWN_HEADS = {384: 12}


def _prefixes(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Every prefix ``P`` such that ``P + 'embeddings.word_embeddings.weight'`` is a key."""
    out = []
    for k in state_dict:
        if k.endswith(_WORD):
            p = k[: -len(_WORD)]
            if p == "" or p.endswith("."):
                out.append(p)
    return sorted(out)


def _is_bert(state_dict: Mapping[str, torch.Tensor], prefix: str) -> bool:
    needed = (
        "embeddings.position_embeddings.weight",
        "encoder.layer.0." + _Q,
        "encoder.layer.0.attention.self.key.weight",
        "encoder.layer.0.attention.self.value.weight",
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.output.dense.weight",
    )
    return all(prefix + n in state_dict for n in needed)


def is_bert(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the state dict holds BERT tensor names (any prefix)."""
    return any(_is_bert(state_dict, p) for p in _prefixes(state_dict))


def detect_family(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered family whose detector accepts the state dict (``"bert"``...), else None."""
    from findlady_core.families import detect

    return detect(state_dict)


def default_num_heads(hidden: int) -> int:
    """Heads assumed for a BERT of width ``hidden`` when no config says: 12 for 384 (MiniLM),
    else ``hidden // 64`` (BERT-tiny/mini/small/base/large all use head_dim 64)."""
    if hidden in _KNOWN_HEADS:
        return _KNOWN_HEADS[hidden]
    if hidden % 64 or hidden < 64:
        raise SpecError(f"cannot guess the number of attention heads for hidden size {hidden}: pass num_heads")
    return hidden // 64


@family("bert", detect=is_bert)
def bert_spec(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None, prefix: str | None = None,
    heads: bool = True,
) -> Spec:
    """The permutation spec of a BERT-style encoder, keyed on its tensor names.

    ``num_heads`` should come from the model's config (``num_attention_heads``) when one is at
    hand: it cannot be read off the weights, and a wrong value makes the dims-inside-heads
    groups break the function. Without it, ``default_num_heads(hidden)`` is used, unless
    ``heads=False``: then the spec has no heads or dims-inside-heads groups (always right, less
    evidence; what a bare file without a head count gets). ``prefix``
    is detected from the names (it must be unique) unless given. The spec is validated.
    """
    if prefix is None:
        found = [p for p in _prefixes(state_dict) if _is_bert(state_dict, p)]
        if not found:
            raise SpecError("not a BERT state dict: no '<prefix>embeddings.word_embeddings.weight' with encoder layers")
        if len(found) > 1:
            raise SpecError(f"several BERT encoders in one state dict (prefixes {found}): pass prefix")
        prefix = found[0]
    elif not _is_bert(state_dict, prefix):
        raise SpecError(f"no BERT encoder under prefix {prefix!r}")
    P = prefix

    def has(name: str) -> bool:
        return P + name in state_dict

    def mem(name: str, axis: int, role: str, offset: int = 0, block: int = 1) -> Member:
        return Member(P + name, axis, offset, block, role)

    def norm(base: str) -> list[Member]:
        # LayerNorm scale and shift: HF names (weight/bias) or old TF-converted ones (gamma/beta).
        return [mem(f"{base}.{s}", 0, "out") for s in ("weight", "bias", "gamma", "beta") if has(f"{base}.{s}")]

    def bias(base: str, offset: int = 0, block: int = 1) -> list[Member]:
        return [mem(f"{base}.bias", 0, "out", offset, block)] if has(f"{base}.bias") else []

    hidden = state_dict[P + _WORD].shape[1]
    layers = []
    while has(f"encoder.layer.{len(layers)}.{_Q}"):
        layers.append(f"encoder.layer.{len(layers)}.")
    heads_given = num_heads is not None
    if not heads and heads_given:
        raise SpecError("heads=False means no head groups: do not pass num_heads with it")
    if num_heads is None and heads:
        num_heads = default_num_heads(hidden)
    if heads and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1
                  or hidden % num_heads):
        raise SpecError(f"num_heads={num_heads!r} does not divide the hidden size {hidden}")
    head_dim = hidden // num_heads if num_heads else 0

    # 1. The residual stream: embeddings write it, every sublayer reads it and writes back.
    res: list[Member] = []
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        if has(f"embeddings.{table}.weight"):
            res.append(mem(f"embeddings.{table}.weight", 1, "out"))  # a table's column is the neuron's own
    res += norm("embeddings.LayerNorm")
    for L in layers:
        for x in ("query", "key", "value"):
            res.append(mem(f"{L}attention.self.{x}.weight", 1, "in"))
        res.append(mem(f"{L}attention.output.dense.weight", 0, "out"))
        res += bias(f"{L}attention.output.dense")
        res += norm(f"{L}attention.output.LayerNorm")
        res.append(mem(f"{L}intermediate.dense.weight", 1, "in"))
        res.append(mem(f"{L}output.dense.weight", 0, "out"))
        res += bias(f"{L}output.dense")
        res += norm(f"{L}output.LayerNorm")
    H = _head_prefix(P)
    if has("pooler.dense.weight"):
        res.append(mem("pooler.dense.weight", 1, "in"))
    else:  # no pooler: a task head reads the hidden states of every token
        res += [Member(H + t, 1, 0, 1, "in") for t in _TOKEN_HEADS if _reads(state_dict, H + t, hidden)]
    res += _mlm_head(state_dict, P)
    groups = [Group("residual", hidden, tuple(res))]

    for L in layers:
        name = L.rstrip(".")
        # 2. Feed-forward neurons.
        inter = state_dict[f"{P}{L}intermediate.dense.weight"].shape[0]
        groups.append(Group(f"{name}.mlp", inter, tuple(
            [mem(f"{L}intermediate.dense.weight", 0, "out")] + bias(f"{L}intermediate.dense")
            + [mem(f"{L}output.dense.weight", 1, "in")])))
        if not heads:
            continue
        # 3. Heads: blocks of head_dim rows of q, k, v and columns of the attention output.
        qkv = [f"{L}attention.self.{x}" for x in ("query", "key", "value")]
        heads: list[Member] = []
        for t in qkv:
            heads += [mem(f"{t}.weight", 0, "out", block=head_dim)] + bias(t, block=head_dim)
        heads.append(mem(f"{L}attention.output.dense.weight", 1, "in", block=head_dim))
        groups.append(Group(f"{name}.attention.heads", num_heads, tuple(heads)))
        # 4. Dims inside each head (applied after the heads group, inside one of its blocks).
        q, k, v = qkv
        for h in range(num_heads):
            off = h * head_dim
            qk: list[Member] = []
            for t in (q, k):
                qk += [mem(f"{t}.weight", 0, "out", off)] + bias(t, offset=off)
            vo = [mem(f"{v}.weight", 0, "out", off)] + bias(v, offset=off)
            vo.append(mem(f"{L}attention.output.dense.weight", 1, "in", off))
            groups.append(Group(f"{name}.attention.head{h}.qk", head_dim, tuple(qk)))
            groups.append(Group(f"{name}.attention.head{h}.vo", head_dim, tuple(vo)))

    pooler = _pooler_group(state_dict, P, H)
    if pooler is not None:
        groups.append(pooler)

    meta: dict[str, Any] = {
        "family": "bert", "prefix": P, "layers": len(layers), "hidden": hidden, "num_heads": num_heads,
        "num_heads_source": "argument" if heads_given else ("default_for_hidden_size" if heads else "none"),
    }
    spec = Spec(tuple(groups), meta)
    spec.validate(state_dict)
    _warn_uncovered(state_dict, spec, P)
    return spec


# Task heads that read the pooler (with one) or every token's hidden state (without one).
_POOLER_HEADS = ("classifier.weight", "cls.seq_relationship.weight")
_TOKEN_HEADS = ("classifier.weight", "qa_outputs.weight")


def _reads(state_dict: Mapping[str, torch.Tensor], name: str, width: int) -> bool:
    t = state_dict.get(name)
    return t is not None and t.dim() == 2 and t.shape[1] == width


def _pooler_group(state_dict: Mapping[str, torch.Tensor], P: str, H: str) -> Group | None:
    """The pooler's hidden neurons with their readers' input columns, if a task head reads them."""
    w = state_dict.get(P + "pooler.dense.weight")
    if w is None:
        return None
    readers = [Member(H + t, 1, 0, 1, "in") for t in _POOLER_HEADS if _reads(state_dict, H + t, w.shape[0])]
    if not readers:
        return None
    own = [Member(P + "pooler.dense.weight", 0, 0, 1, "out")]
    if P + "pooler.dense.bias" in state_dict:
        own.append(Member(P + "pooler.dense.bias", 0, 0, 1, "out"))
    return Group("pooler", w.shape[0], tuple(own + readers))


def _mlm_head(state_dict: Mapping[str, torch.Tensor], P: str) -> list[Member]:
    """Residual members of a masked-LM head (BertForMaskedLM/BertForPreTraining), if any.

    Its decoder is tied to the word embeddings, so the transform's output space must move with
    the hidden stream too: the transform is permuted on both axes, the decoder on its columns.
    """
    base = _head_prefix(P) + "cls.predictions."
    if base + "transform.dense.weight" not in state_dict:
        return []
    out = [Member(base + "transform.dense.weight", 1, 0, 1, "in"),
           Member(base + "transform.dense.weight", 0, 0, 1, "out")]
    for n in ("transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias",
              "transform.LayerNorm.gamma", "transform.LayerNorm.beta"):
        if base + n in state_dict:
            out.append(Member(base + n, 0, 0, 1, "out"))
    if base + "decoder.weight" in state_dict:
        out.append(Member(base + "decoder.weight", 1, 0, 1, "in"))
    return out


def _head_prefix(P: str) -> str:
    """Prefix of task heads next to the encoder: ``bert.`` models keep them at the top level."""
    return P[: -len("bert.")] if P.endswith("bert.") else P


def uncovered(state_dict: Mapping[str, torch.Tensor], spec: Spec) -> list[str]:
    """Floating tensors a BERT spec leaves alone that might read the hidden stream (a tensor
    BERT does not have, e.g. RoBERTa's classifier.dense): with any, the spec may break the
    function."""
    P = str((spec.meta or {}).get("prefix", ""))
    H = _head_prefix(P)
    # What reads only the pooler's output (when it stays in place), or writes the output side.
    safe = (P + "pooler.dense.bias", H + "classifier.bias", H + "qa_outputs.bias", H + "cls.seq_relationship.bias",
            H + "cls.predictions.bias", H + "cls.predictions.decoder.bias")
    if P + "pooler.dense.weight" in state_dict:
        safe += tuple(H + t for t in _POOLER_HEADS)
    # q, k, v biases live on the heads' axis: untouched when the spec has no head groups.
    inside = tuple(f"attention.self.{x}.bias" for x in ("query", "key", "value"))
    covered = spec.tensors
    return [k for k, t in state_dict.items()
            if t.is_floating_point() and k not in covered and not k.startswith(safe) and not k.endswith(inside)]


def _warn_uncovered(state_dict: Mapping[str, torch.Tensor], spec: Spec, P: str) -> None:
    """Warn about floating tensors the spec leaves alone that might read the hidden stream."""
    odd = uncovered(state_dict, spec)
    if odd:
        warnings.warn(
            f"BERT spec leaves {len(odd)} floating tensors untouched (e.g. {odd[:3]}); if any reads the "
            "encoder's hidden states, permuting the residual group will change the model's function",
            stacklevel=3,
        )
