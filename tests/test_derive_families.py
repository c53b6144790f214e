"""Specs derived from a config (issue 11 must-shows) on tiny random-init folders.

For each family: a model built from transformers' own config class with random weights, saved
with ``save_pretrained``. The spec derived from the folder (config + safetensors headers) must
keep the logits with every group permuted (checked here through ``from_pretrained`` of a
permuted copy of the files, independently of the spec's own self-check), must be complete
(its neurons equal the symmetry counted by hand), and whole-model re-synchronization after a
permutation of every group plus noise 0.1 must give Psi = 100.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from findlady_core import attacks
from findlady_core.derive import spec_from_config, spec_from_folder
from findlady_core.permute import apply_permutations, psi, psi_composed, random_permutations, recovering_permutations
from findlady_core.resync import resync
from findlady_core.spec import Spec
from findlady_examples.tiny_folders import randomize  # unit-scale weights: ones and zeros hide symmetries

H, HEADS, LAYERS = 32, 4, 2
HD = H // HEADS


def _configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        "bert": transformers.BertConfig(
            hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=37,
            vocab_size=60, max_position_embeddings=32, num_labels=3, architectures=["BertForSequenceClassification"]),
        "gpt2": transformers.GPT2Config(
            n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=60, n_positions=32, bos_token_id=0, eos_token_id=0,
            architectures=["GPT2LMHeadModel"]),
        "llama": transformers.LlamaConfig(
            hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
            intermediate_size=40, vocab_size=60, max_position_embeddings=32, tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"]),
        "vit": transformers.ViTConfig(
            hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=37, image_size=32,
            patch_size=8, num_labels=3, architectures=["ViTForImageClassification"]),
        "resnet": transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 2, 1], layer_type="basic", num_labels=3,
            architectures=["ResNetForImageClassification"]),
    }


def _hand_count(name: str) -> int:
    """The architecture's permutation symmetry in neurons, counted from the config by hand."""
    heads_and_dims = HEADS + HEADS * HD + HEADS * HD  # heads, q/k dims per head, v/o dims per head
    if name == "bert":
        return H + LAYERS * (heads_and_dims + 37) + H  # residual, layers (heads, FFN), pooler
    if name == "gpt2":
        return H + LAYERS * (heads_and_dims + 4 * H)
    if name == "llama":
        # rotary pins the q/k dims; 2 kv heads, 2 query heads in each kv group, v/o dims per kv head
        return H + LAYERS * (2 + 2 * 2 + 2 * HD + 40)
    if name == "vit":
        return H + LAYERS * (heads_and_dims + 37)
    if name == "resnet":
        # residual stream per stage (8: stem and stage 0, identity shortcut; 16 and 24: projection
        # shortcuts) plus each basic block's inner channels
        return 8 + 8 + 16 + 16 * 2 + 24 + 24
    raise KeyError(name)


def _inputs(name: str, cfg: transformers.PretrainedConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name in ("vit", "resnet"):
        size = getattr(cfg, "image_size", 32)
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)}
    return {"input_ids": torch.randint(0, cfg.vocab_size, (2, 7), generator=g)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, cfg in _configs().items():
        d = tmp_path_factory.mktemp(name)
        model = getattr(transformers, cfg.architectures[0])(cfg)
        randomize(model, 0)
        model.save_pretrained(d)
        out[name] = (d, cfg, spec_from_folder(d))
    return out


FAMILIES = ["bert", "gpt2", "llama", "vit", "resnet"]


def _logits(folder, cfg, name):
    cls = getattr(transformers, cfg.architectures[0])
    model = cls.from_pretrained(folder, dtype=torch.float64, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**_inputs(name, cfg)).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_spec_keeps_the_logits_with_every_group_permuted(folders, tmp_path, name):
    folder, cfg, spec = folders[name]
    assert spec.source == "config"
    sd = load_file(str(folder / "model.safetensors"))
    assert spec.tensors <= set(sd)  # names as stored (tied lm_head and ViT's renamed modules)
    perms = random_permutations(spec, seed=5)
    permuted = apply_permutations(sd, spec, perms)
    moved = [k for k in spec.tensors if not torch.equal(permuted[k], sd[k])]
    assert len(moved) > len(spec.tensors) // 2
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in permuted.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ref, got = _logits(folder, cfg, name), _logits(tmp_path, cfg, name)
    err = float((ref - got).abs().max() / ref.abs().max())
    # Llama's RMSNorm computes in float32 even in a float64 model
    assert err <= (1e-6 if name == "llama" else 1e-9), err
    assert spec.meta["self_check"]["relative_error"] <= spec.meta["self_check"]["tolerance"]


@pytest.mark.parametrize("name", FAMILIES)
def test_spec_is_complete(folders, name):
    _, _, spec = folders[name]
    assert spec.neurons == _hand_count(name), [(g.name, g.size) for g in spec.groups]


def test_structure_of_attention_groups(folders):
    # GPT-2: the fused c_attn is cut into q|k|v by offsets, heads move in all three at once
    gpt2 = folders["gpt2"][2]
    heads = [g for g in gpt2.groups if g.size == HEADS]
    assert len(heads) == LAYERS
    offs = sorted(m.offset for m in heads[0].members if m.tensor.endswith("c_attn.weight"))
    assert offs == [0, H, 2 * H] and all(m.axis == 1 and m.block == HD for m in heads[0].members if m.tensor.endswith("c_attn.weight"))
    assert "lm_head.weight" not in gpt2.tensors  # tied to transformer.wte.weight, stored once
    # Llama: no group on the q/k dims (rotary), the warnings say why; v/o dims per kv head span
    # the o_proj columns of both query heads of the group
    llama = folders["llama"][2]
    assert any("rotary" in w for w in llama.warnings)
    vo = [g for g in llama.groups if g.size == HD]
    assert len(vo) == 2 * LAYERS
    for g in vo:
        tensors = sorted(m.tensor.rsplit(".", 2)[1] for m in g.members)
        assert tensors == ["o_proj", "o_proj", "v_proj"], g
    # the spec survives a JSON round trip with its source and warnings
    back = Spec.from_json(llama.to_json())
    assert back == llama and back.source == "config" and back.warnings == llama.warnings


@pytest.mark.parametrize("name", FAMILIES)
def test_whole_model_resync_after_permutation_and_noise(folders, name):
    folder, _, spec = folders[name]
    sd = load_file(str(folder / "model.safetensors"))
    q = random_permutations(spec, seed=11)
    sus = apply_permutations(sd, spec, q)
    sus = attacks.gaussian_noise(sus, 0.1, targets=attacks.attack_targets(sus), seed=3)
    shapes = {k: v.shape for k, v in sd.items()}
    truth = recovering_permutations(spec, q, shapes)
    r = resync(sd, sus, spec, device="cpu")
    assert psi_composed(spec, q, r.permutations, shapes) == 100.0
    assert psi(spec, truth, r.permutations)[1] == 100.0


def test_base_model_outputs_move_with_the_residual():
    """A model without a task head returns hidden states: the spec permutes them with the
    residual group, says so, and its self-check compares them after that permutation."""
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                  vocab_size=40, max_position_embeddings=16, architectures=["BertModel"])
    spec = spec_from_config(json.loads(cfg.to_json_string()))
    assert spec.neurons == 16 + (2 + 2 * 8 + 2 * 8 + 20) + 16  # residual, layer, pooler
    assert any("outputs move" in w for w in spec.warnings)
