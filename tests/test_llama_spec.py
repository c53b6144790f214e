"""The benchmark's Llama spec (benchmarks/llama_spec.py) on a tiny transformers LlamaForCausalLM:
permuting every group keeps the float64 logits, and re-synchronization undoes it."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from benchmarks.llama_spec import llama_spec, random_llama  # noqa: E402
from findlady_core.attacks import permute  # noqa: E402
from findlady_core.permute import psi_composed  # noqa: E402
from findlady_core.resync import resync  # noqa: E402

SHAPE = {"hidden": 64, "layers": 2, "heads": 8, "kv_heads": 2, "intermediate": 96, "vocab": 50}


def _rms_norm_float64(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # transformers' LlamaRMSNorm computes in float32 whatever the model's dtype; in float64 the
    # permuted model's logits agree to rounding (1e-12) instead of float32's 1e-7
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _model(shape: dict[str, int] = SHAPE) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=shape["hidden"], num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], intermediate_size=shape["intermediate"], vocab_size=shape["vocab"],
        tie_word_embeddings=False, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).double().eval()
    for mod in m.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = _rms_norm_float64.__get__(mod)
    with torch.no_grad():  # norm scales away from 1, so that permuting them would show
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _logits(model: torch.nn.Module, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_group_preserves_the_function_and_is_recovered():
    model = _model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    spec = llama_spec(sd, num_heads=SHAPE["heads"], num_kv_heads=SHAPE["kv_heads"])
    names = {g.name.split(".")[-1] for g in spec.groups}
    assert {"residual", "mlp", "kv_heads", "q_heads"} <= names
    ids = torch.randint(0, SHAPE["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(model, sd, ids)
    atk = permute(sd, spec, seed=3)
    moved = sum(int(not torch.equal(atk.state_dict[k], sd[k])) for k in sd)
    assert moved == len(sd)  # every tensor is touched by some group
    torch.testing.assert_close(_logits(model, atk.state_dict, ids), before, rtol=0, atol=1e-10)

    r = resync(sd, atk.state_dict, spec, device="cpu")
    shapes = {k: v.shape for k, v in sd.items()}
    assert psi_composed(spec, atk.attack, r.permutations, shapes) == 100.0
    assert all(torch.equal(r.state_dict[k], sd[k]) for k in sd)


def test_multi_head_attention_permutes_v_dims_too():
    """One query head per kv head: the v dims of each head are a group, and still preserve."""
    shape = {**SHAPE, "kv_heads": SHAPE["heads"]}
    model = _model(shape)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    spec = llama_spec(sd, num_heads=shape["heads"], num_kv_heads=shape["kv_heads"])
    assert sum(g.name.endswith("v_dims") for g in spec.groups) == shape["layers"] * shape["heads"]
    ids = torch.randint(0, shape["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(model, sd, ids)
    torch.testing.assert_close(_logits(model, permute(sd, spec, seed=5).state_dict, ids), before, rtol=0, atol=1e-10)


def test_a_wrong_head_count_breaks_the_function():
    """The check above can fail: the spec built with the wrong number of kv heads permutes
    query heads away from their keys, and the logits change."""
    model = _model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = llama_spec(sd, num_heads=SHAPE["heads"], num_kv_heads=1)  # all query heads on one kv head
    ids = torch.randint(0, SHAPE["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(model, sd, ids)
    after = _logits(model, permute(sd, wrong, seed=3).state_dict, ids)
    assert not torch.allclose(after, before, atol=1e-6)


def test_random_llama_fits_the_transformers_model():
    sd = random_llama(**SHAPE, dtype=torch.float64)
    model = _model()
    model.load_state_dict(sd, strict=True)  # same names and shapes as transformers writes
    assert llama_spec(sd, num_heads=SHAPE["heads"], num_kv_heads=SHAPE["kv_heads"]).neurons > 0
