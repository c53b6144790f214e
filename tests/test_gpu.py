"""The GPU path: the same algorithm and the same permutations on CUDA as on the CPU.

The comparison runs where CUDA exists and is skipped elsewhere. ``benchmarks/gpu_check.sh``
(the full-size check for a GPU machine) runs here on the CPU alone, small, so it cannot rot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from findlady_core.permute import apply_permutations, random_permutations, recovering_permutations
from findlady_core.report import verify
from findlady_core.resync import resync

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ runs from the checkout; its model builder is reused here
from benchmarks.gpu_check import SMALL, llama_spec, llama_state_dict, suspect_of  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def test_gpu_check_script_runs_on_the_cpu_alone_without_the_service_stack() -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-only", "--small"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["cpu_psi"] == 100.0 and out["shape"] == SMALL and out["groups"] == 1 + 2 * SMALL["layers"]
    assert out["service_stack_loaded"] == []


def test_the_llama_spec_preserves_the_function_of_its_groups() -> None:
    """The check's spec is only worth its times if permuting it is a real symmetry: run a
    Llama forward pass (RMSNorm, grouped-query attention with rotary embeddings, SwiGLU) before
    and after permuting every group."""
    spec = llama_spec(SMALL)
    sd = llama_state_dict(SMALL, seed=0)
    perms = random_permutations(spec, seed=3)
    moved = apply_permutations(sd, spec, perms)
    tokens = torch.randint(0, SMALL["vocab"], (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_llama_forward(moved, tokens), _llama_forward(sd, tokens), rtol=1e-4, atol=1e-4)
    sus, truth = suspect_of(sd, spec, seed=5, noise=0.1)
    r = resync(sd, sus, spec, device="cpu")
    assert all(torch.equal(r.permutations[n], truth[n]) for n in spec.names)


def _llama_forward(sd: dict, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[type-arg]
    H, L, nh, nkv = SMALL["hidden"], SMALL["layers"], SMALL["heads"], SMALL["kv_heads"]
    hd, T = H // nh, tokens.shape[1]

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x: torch.Tensor) -> torch.Tensor:
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-b, a], -1) * sin

    x = sd["model.embed_tokens.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(L):
        p = f"model.layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(2, T, nh, hd).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(2, T, nkv, hd).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(2, T, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5 + mask, -1) @ v
        x = x + att.transpose(1, 2).reshape(2, T, H) @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
        x = x + gate @ sd[p + "mlp.down_proj.weight"].T
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@needs_cuda
def test_cuda_recovers_the_same_permutations_and_verdict_as_the_cpu() -> None:
    spec = llama_spec(SMALL)
    ref = llama_state_dict(SMALL, seed=0)
    sus, truth = suspect_of(ref, spec, seed=9, noise=0.3)
    on = {d: resync(ref, sus, spec, device=d) for d in ("cpu", "cuda")}
    assert on["cuda"].device.startswith("cuda")
    for n in spec.names:
        assert torch.equal(on["cpu"].permutations[n], on["cuda"].permutations[n]), n
        assert torch.equal(on["cpu"].permutations[n], truth[n]), n
    unrelated = llama_state_dict(SMALL, seed=1)
    for suspect in (sus, unrelated):
        verdicts = {d: verify(ref, suspect, spec, device=d)["verdict"] for d in ("cpu", "cuda")}
        assert verdicts["cpu"] == verdicts["cuda"], verdicts


def test_auto_means_the_cpu_without_cuda_and_cuda_with_it() -> None:
    spec = llama_spec(SMALL)
    ref = llama_state_dict(SMALL, seed=0)
    r = resync(ref, apply_permutations(ref, spec, random_permutations(spec, seed=1)), spec, device="auto")
    assert r.device.startswith("cuda" if torch.cuda.is_available() else "cpu")
    truth = recovering_permutations(spec, random_permutations(spec, seed=1), {k: v.shape for k, v in ref.items()})
    assert all(torch.equal(r.permutations[n], truth[n]) for n in spec.names)
