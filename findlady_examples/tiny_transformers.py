"""Random-init tiny Llama (GQA, untied head) and GPT-2 (tied head) in float64, for the rotation
tests and benchmark, with hand-written permutation specs: the residual stream and each layer's MLP neurons
(heads are left pinned; they are not what a rotation touches). Norm weights and biases are
drawn away from their init (ones, zeros) so that folding them is not a no-op.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from findlady_core.spec import Group, Member, Spec

VOCAB, HIDDEN, LAYERS = 256, 64, 2


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=4,
                      bos_token_id=0, eos_token_id=0)


CONFIGS = {"llama": llama_config, "gpt2": gpt2_config}
CLASSES = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}


def build(kind: str, config: Any | None = None) -> torch.nn.Module:
    config = config or CONFIGS[kind]()
    return CLASSES[kind](config).double().eval()


def state_dict(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """The weights as a file would store them (GPT-2's tied head stored once, as ``wte``)."""
    torch.manual_seed(seed)
    model = build(kind)
    g = torch.Generator().manual_seed(seed + 1000)
    sd = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if "norm" in name or ".ln_" in name:
            t = 1 + 0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype) if name.endswith("weight") \
                else 0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        sd[name] = t
    if kind == "gpt2":
        sd.pop("lm_head.weight")
    return sd


def logits(kind: str, sd: dict[str, torch.Tensor], *, tied: bool | None = None) -> torch.Tensor:
    """The model's logits on fixed token ids, loaded from ``sd`` (``tied``: override the config's
    tie; a folded or rotated GPT-2 has its head untied)."""
    config = CONFIGS[kind]()
    if tied is not None:
        config.tie_word_embeddings = tied
    model = build(kind, config)
    result = model.load_state_dict(sd, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise ValueError(f"weights do not fit the {kind} model: {result}")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(ids).logits


def _group(name: str, size: int, members: list[tuple[str, int, str]]) -> Group:
    return Group(name, size, tuple(Member(t, a, role=r) for t, a, r in members))


def llama_spec() -> Spec:
    P, inter = "model.", 128
    stream = [(f"{P}embed_tokens.weight", 1, "out"), (f"{P}norm.weight", 0, "out"), ("lm_head.weight", 1, "in")]
    groups = []
    for i in range(LAYERS):
        L = f"{P}layers.{i}."
        stream += [(f"{L}input_layernorm.weight", 0, "out"), (f"{L}post_attention_layernorm.weight", 0, "out")]
        stream += [(f"{L}self_attn.{n}_proj.weight", 1, "in") for n in "qkv"]
        stream += [(f"{L}mlp.{n}_proj.weight", 1, "in") for n in ("gate", "up")]
        stream += [(f"{L}self_attn.o_proj.weight", 0, "out"), (f"{L}mlp.down_proj.weight", 0, "out")]
        groups.append(_group(f"{L}mlp", inter, [(f"{L}mlp.gate_proj.weight", 0, "out"), (f"{L}mlp.up_proj.weight", 0, "out"),
                                                (f"{L}mlp.down_proj.weight", 1, "in")]))
    return Spec((_group("stream", HIDDEN, stream), *groups))


def gpt2_spec() -> Spec:
    P, inter = "transformer.", 4 * HIDDEN
    stream = [(f"{P}wte.weight", 1, "out"), (f"{P}wpe.weight", 1, "out"), (f"{P}ln_f.weight", 0, "out"),
              (f"{P}ln_f.bias", 0, "out")]
    groups = []
    for i in range(LAYERS):
        H = f"{P}h.{i}."
        stream += [(f"{H}{n}.{w}", 0, "out") for n in ("ln_1", "ln_2") for w in ("weight", "bias")]
        stream += [(f"{H}attn.c_attn.weight", 0, "in"), (f"{H}mlp.c_fc.weight", 0, "in")]
        stream += [(f"{H}{n}.c_proj.weight", 1, "out") for n in ("attn", "mlp")]
        stream += [(f"{H}{n}.c_proj.bias", 0, "out") for n in ("attn", "mlp")]
        groups.append(_group(f"{H}mlp", inter, [(f"{H}mlp.c_fc.weight", 1, "out"), (f"{H}mlp.c_fc.bias", 0, "out"),
                                                (f"{H}mlp.c_proj.weight", 0, "in")]))
    return Spec((_group("stream", HIDDEN, stream), *groups))


SPECS = {"llama": llama_spec, "gpt2": gpt2_spec}
