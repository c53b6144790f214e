"""Tiny random-init transformers models saved as folders, for obfuscation tests and benchmarks.

``Folder(name, path, seed)``: a Llama (grouped-query attention, rotary, SwiGLU), GPT-2 (fused
``c_attn``), Phi (partial rotary: half of each head's q/k dims rotated) or ResNet (conv + BatchNorm) of a few thousand parameters, random weights and
statistics at unit scale (an init of ones and zeros would hide symmetries), written with
``save_pretrained``; ``.sd`` the stored tensors, ``.spec`` the spec derived from the folder's
``config.json``, ``.logits(sd)`` the model's output on fixed inputs with other weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from findlady_core.derive import spec_from_folder

NAMES = ("llama", "gpt2", "phi", "resnet")
H, HEADS, KV = 32, 4, 2


def config(name: str) -> transformers.PretrainedConfig:
    if name == "llama":
        return transformers.LlamaConfig(
            hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV,
            intermediate_size=40, vocab_size=60, max_position_embeddings=32, tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"])
    if name == "gpt2":
        return transformers.GPT2Config(n_embd=H, n_layer=2, n_head=HEADS, vocab_size=60, n_positions=32,
                                       bos_token_id=0, eos_token_id=0, architectures=["GPT2LMHeadModel"])
    if name == "phi":
        return transformers.PhiConfig(hidden_size=2 * H, num_hidden_layers=2, num_attention_heads=HEADS,
                                      intermediate_size=40, vocab_size=60, max_position_embeddings=32,
                                      partial_rotary_factor=0.5, architectures=["PhiForCausalLM"])
    if name == "resnet":
        return transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                         num_labels=3, architectures=["ResNetForImageClassification"])
    raise KeyError(name)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights and statistics (an init of ones and zeros hides symmetries)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (0.5 if p.dim() < 2 else 0.0))
        for n, b in model.named_buffers():
            if n.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif n.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)


class Folder:
    def __init__(self, name: str, path: Path, seed: int) -> None:
        cfg = config(name)
        self.model = getattr(transformers, cfg.architectures[0])(cfg).eval()
        randomize(self.model, seed)
        self.model.save_pretrained(path)
        self.name, self.cfg = name, cfg
        self.sd = load_file(str(path / "model.safetensors"))
        self.spec = spec_from_folder(path)

    def logits(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        if self.name == "resnet":
            x = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
        else:
            x = {"input_ids": torch.randint(0, 60, (2, 9), generator=g)}
        with torch.no_grad():
            return torch.func.functional_call(self.model, dict(sd), args=(), kwargs=x, strict=False).logits
