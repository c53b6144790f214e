"""The permutation spec of a Llama-style decoder (Hugging Face ``LlamaForCausalLM`` names), and
a random-init state dict of one, built directly in bf16 (for ``benchmarks.scale``).

Groups, in spec order (nested groups after the group whose blocks hold them):

* ``residual`` (hidden): embedding and LM-head columns, every RMSNorm scale, the input columns
  of q/k/v/gate/up and the output rows of o/down (RMSNorm's mean square is invariant under a
  permutation of the stream, so permuting all of them together preserves the function);
* ``layers.L.mlp`` (intermediate): gate and up rows, down columns (SiLU(gate) * up is
  elementwise per neuron);
* ``layers.L.kv_heads`` (kv heads): a kv head's k and v rows (blocks of head_dim), the rows of
  the query heads that share it and their o_proj columns (blocks of group * head_dim);
* ``layers.L.kvJ.q_heads`` (query heads per kv head, when more than one): inside kv head J's
  block, the query heads' q rows and o columns (blocks of head_dim);
* ``layers.L.kvJ.v_dims`` (head_dim), only with one query head per kv head: kv head J's v rows
  and its o_proj columns. With grouped queries the same v-dims permutation would have to act
  on the o_proj columns of every query head of the group, ``per`` members on one tensor axis,
  which the spec format does not allow (one member per tensor axis and group): there the
  v dims stay pinned (the spec is still function-preserving, it just permutes less).

q and k dims inside a head are pinned: rotary embeddings mix dim i with dim i + head_dim/2.
Kept here, not in the core's family registry: it is only as general as the shapes below
(``tests/test_llama_spec.py`` checks it on a tiny transformers model, float64 logits equal).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from findlady_core.spec import Group, Member, Spec

TINYLLAMA = {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab": 32000}


def llama_spec(state_dict: Mapping[str, torch.Tensor], *, num_heads: int, num_kv_heads: int) -> Spec:
    """The spec of a Llama state dict; ``num_heads`` and ``num_kv_heads`` from its config."""
    hidden = state_dict["model.embed_tokens.weight"].shape[1]
    layers = 0
    while f"model.layers.{layers}.self_attn.q_proj.weight" in state_dict:
        layers += 1
    hd = hidden // num_heads
    per = num_heads // num_kv_heads  # query heads per kv head
    res = [Member("model.embed_tokens.weight", 1, role="out")]
    groups: list[Group] = []
    for i in range(layers):
        L = f"model.layers.{i}."
        res.append(Member(f"{L}input_layernorm.weight", 0, role="out"))
        res += [Member(f"{L}self_attn.{x}_proj.weight", 1, role="in") for x in "qkv"]
        res.append(Member(f"{L}self_attn.o_proj.weight", 0, role="out"))
        res.append(Member(f"{L}post_attention_layernorm.weight", 0, role="out"))
        res += [Member(f"{L}mlp.{x}_proj.weight", 1, role="in") for x in ("gate", "up")]
        res.append(Member(f"{L}mlp.down_proj.weight", 0, role="out"))
    res.append(Member("model.norm.weight", 0, role="out"))
    if "lm_head.weight" in state_dict:
        res.append(Member("lm_head.weight", 1, role="in"))
    groups.append(Group("residual", hidden, tuple(res)))
    for i in range(layers):
        L = f"model.layers.{i}."
        q, k, v, o = (f"{L}self_attn.{x}_proj.weight" for x in "qkvo")
        inter = state_dict[f"{L}mlp.gate_proj.weight"].shape[0]
        groups.append(Group(f"layers.{i}.mlp", inter, (
            Member(f"{L}mlp.gate_proj.weight", 0, role="out"), Member(f"{L}mlp.up_proj.weight", 0, role="out"),
            Member(f"{L}mlp.down_proj.weight", 1, role="in"))))
        groups.append(Group(f"layers.{i}.kv_heads", num_kv_heads, (
            Member(k, 0, block=hd, role="out"), Member(v, 0, block=hd, role="out"),
            Member(q, 0, block=per * hd, role="out"), Member(o, 1, block=per * hd, role="in"))))
        for j in range(num_kv_heads):
            base = j * per * hd
            if per > 1:
                groups.append(Group(f"layers.{i}.kv{j}.q_heads", per, (
                    Member(q, 0, offset=base, block=hd, role="out"), Member(o, 1, offset=base, block=hd, role="in"))))
            if per == 1:
                groups.append(Group(f"layers.{i}.kv{j}.v_dims", hd, (
                    Member(v, 0, offset=j * hd, role="out"), Member(o, 1, offset=base, role="in"))))
    spec = Spec(tuple(groups), {"family": "llama (benchmark)", "layers": layers, "hidden": hidden,
                                "num_heads": num_heads, "num_kv_heads": num_kv_heads})
    spec = Spec.from_dict(spec.to_dict())  # the format's own checks (what a spec file must pass)
    spec.validate(state_dict)
    return spec


def random_llama(*, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                 seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:  # fmt: skip
    """A random-init Llama state dict (std 0.02 weights, unit norm scales), made in ``dtype``
    directly: transformers' float32 init of 1.1B parameters would take minutes and 4.4 GB."""
    gen = torch.Generator().manual_seed(seed)
    hd = hidden // heads

    def w(rows: int, cols: int) -> torch.Tensor:
        t = torch.empty(rows, cols, dtype=dtype)
        for r in range(0, rows, 1024):  # float32 noise a slice at a time
            n = min(1024, rows - r)
            t[r : r + n] = (torch.randn(n, cols, generator=gen) * 0.02).to(dtype)
        return t

    def scale() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)

    sd = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        L = f"model.layers.{i}."
        sd[f"{L}self_attn.q_proj.weight"] = w(heads * hd, hidden)
        sd[f"{L}self_attn.k_proj.weight"] = w(kv_heads * hd, hidden)
        sd[f"{L}self_attn.v_proj.weight"] = w(kv_heads * hd, hidden)
        sd[f"{L}self_attn.o_proj.weight"] = w(hidden, heads * hd)
        sd[f"{L}mlp.gate_proj.weight"] = w(intermediate, hidden)
        sd[f"{L}mlp.up_proj.weight"] = w(intermediate, hidden)
        sd[f"{L}mlp.down_proj.weight"] = w(hidden, intermediate)
        sd[f"{L}input_layernorm.weight"] = scale()
        sd[f"{L}post_attention_layernorm.weight"] = scale()
    sd["model.norm.weight"] = scale()
    sd["lm_head.weight"] = w(vocab, hidden)
    return sd
