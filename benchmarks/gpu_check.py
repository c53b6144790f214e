"""GPU check: re-synchronize a permuted Llama-shaped model (about 1.1B parameters) on CUDA and on
the CPU; print both times and whether the recovered permutations agree.

Uses ``findlady_core`` and torch only (no service stack, no transformers weights, no
downloads): the state dict is built in memory with ``torch.randn`` in the layout Hugging Face
uses for Llama (hidden 2048, 22 layers, 32 query heads sharing 4 key/value heads, MLP 5632,
vocabulary 32000, TinyLlama-1.1B's shapes), the spec in code: the residual stream, each
layer's MLP neurons and each layer's key/value heads (each moving with its 8 query heads).
Rotary embeddings act inside a head, so moving whole heads preserves the function; dims
inside a head are left in place. Every group is permuted and every tensor gets Gaussian noise
(``--noise`` standard deviations), so the matching has to work.

    benchmarks/gpu_check.sh                  # CUDA and CPU, full size (needs CUDA; under 5 min on one GPU box)
    benchmarks/gpu_check.sh --cpu-only --small   # CI: a tiny model of the same shape, CPU alone

Exit 0 when the devices agree and each put every neuron back; 1 when not; 2 when asked for CUDA
without it or when a module the core needs is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

FULL = {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "mlp": 5632, "vocab": 32000}
SMALL = {"hidden": 64, "layers": 2, "heads": 8, "kv_heads": 2, "mlp": 176, "vocab": 500}
NEEDED = ("torch", "numpy", "scipy", "safetensors", "tqdm")  # what findlady_core imports
SERVICE_STACK = ("app", "workers", "fastapi", "sqlalchemy", "celery", "uvicorn", "transformers")


def llama_state_dict(shape: dict[str, int], seed: int) -> dict[str, object]:
    import torch

    g = torch.Generator().manual_seed(seed)
    H, L, nh, nkv, inter, V = (shape[k] for k in ("hidden", "layers", "heads", "kv_heads", "mlp", "vocab"))
    hd = H // nh

    def w(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g) / size[-1] ** 0.5

    sd = {"model.embed_tokens.weight": w(V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[p + "self_attn.q_proj.weight"] = w(nh * hd, H)
        sd[p + "self_attn.k_proj.weight"] = w(nkv * hd, H)
        sd[p + "self_attn.v_proj.weight"] = w(nkv * hd, H)
        sd[p + "self_attn.o_proj.weight"] = w(H, nh * hd)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[p + "mlp.gate_proj.weight"] = w(inter, H)
        sd[p + "mlp.up_proj.weight"] = w(inter, H)
        sd[p + "mlp.down_proj.weight"] = w(H, inter)
    sd["model.norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    sd["lm_head.weight"] = w(V, H)
    return sd


def llama_spec(shape: dict[str, int]):  # type: ignore[no-untyped-def]
    from findlady_core.spec import Group, Member, Spec

    H, L, nh, nkv, inter = (shape[k] for k in ("hidden", "layers", "heads", "kv_heads", "mlp"))
    hd = H // nh
    q_block = nh // nkv * hd  # the query heads that share one key/value head, as rows of q_proj
    res = [Member("model.embed_tokens.weight", 1, role="out")]
    groups = []
    for i in range(L):
        p = f"model.layers.{i}."
        res += [Member(p + "input_layernorm.weight", 0, role="out")]
        res += [Member(p + f"self_attn.{x}_proj.weight", 1, role="in") for x in "qkv"]
        res += [Member(p + "self_attn.o_proj.weight", 0, role="out"),
                Member(p + "post_attention_layernorm.weight", 0, role="out")]
        res += [Member(p + f"mlp.{x}_proj.weight", 1, role="in") for x in ("gate", "up")]
        res += [Member(p + "mlp.down_proj.weight", 0, role="out")]
        groups.append(Group(f"layer{i}.mlp", inter, (
            Member(p + "mlp.gate_proj.weight", 0, role="out"), Member(p + "mlp.up_proj.weight", 0, role="out"),
            Member(p + "mlp.down_proj.weight", 1, role="in"))))
        groups.append(Group(f"layer{i}.kv_heads", nkv, (
            Member(p + "self_attn.q_proj.weight", 0, block=q_block, role="out"),
            Member(p + "self_attn.k_proj.weight", 0, block=hd, role="out"),
            Member(p + "self_attn.v_proj.weight", 0, block=hd, role="out"),
            Member(p + "self_attn.o_proj.weight", 1, block=q_block, role="in"))))
    res += [Member("model.norm.weight", 0, role="out"), Member("lm_head.weight", 1, role="in")]
    return Spec((Group("residual", H, tuple(res)), *groups), {"family": "llama (gpu_check)"})


def suspect_of(reference: dict, spec, seed: int, noise: float) -> tuple[dict, dict]:  # type: ignore[no-untyped-def,type-arg]
    import torch

    from findlady_core.permute import apply_permutations, random_permutations, recovering_permutations

    attack = random_permutations(spec, seed=seed)
    sus = apply_permutations(reference, spec, attack)
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in sus.items():
        sus[k] = v + noise * v.std() * torch.randn(v.shape, generator=g)
    truth = recovering_permutations(spec, attack, {k: v.shape for k, v in reference.items()})
    return sus, truth


def run_on(device: str, reference: dict, suspect: dict, spec) -> tuple[float, dict]:  # type: ignore[no-untyped-def,type-arg]
    import torch

    from findlady_core.resync import resync

    if device == "cuda":
        torch.ones(1, device="cuda").sum().item()  # CUDA context and kernels loaded before the clock starts
    t0 = time.perf_counter()
    result = resync(reference, suspect, spec, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return seconds, {k: v.cpu() for k, v in result.permutations.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-only", action="store_true", help="the CPU alone (CI: keeps the script from rotting)")
    ap.add_argument("--small", action="store_true", help=f"a tiny model of the same layout {SMALL}")
    ap.add_argument("--noise", type=float, default=0.1, help="Gaussian noise on every tensor, in its std")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check: this python lacks {', '.join(missing)} (findlady_core needs {', '.join(NEEDED)}); "
              "nothing is installed by this script", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.cpu_only and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (run with --cpu-only for the CPU alone)", file=sys.stderr)
        return 2
    shape = SMALL if args.small else FULL
    t0 = time.perf_counter()
    spec = llama_spec(shape)
    reference = llama_state_dict(shape, args.seed)
    spec.validate(reference)
    suspect, truth = suspect_of(reference, spec, args.seed + 7, args.noise)
    build = time.perf_counter() - t0
    params = sum(v.numel() for v in reference.values())

    from findlady_core.permute import psi

    out: dict[str, object] = {"shape": shape, "parameters": params, "groups": len(spec.groups),
                              "neurons": spec.neurons, "noise": args.noise, "build_seconds": round(build, 2),
                              "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    perms = {}
    for device in ["cpu"] + ([] if args.cpu_only else ["cuda"]):
        seconds, perms[device] = run_on(device, reference, suspect, spec)
        out[f"{device}_seconds"] = round(seconds, 3)
        out[f"{device}_psi"] = psi(spec, truth, perms[device])[1]
    if not args.cpu_only:
        out["cuda_device"] = torch.cuda.get_device_name(0)
        out["permutations_agree"] = all(torch.equal(perms["cpu"][n], perms["cuda"][n]) for n in spec.names)
        out["speedup"] = round(float(out["cpu_seconds"]) / float(out["cuda_seconds"]), 2)  # type: ignore[arg-type]
    out["service_stack_loaded"] = sorted(m for m in SERVICE_STACK if m in sys.modules)
    print(json.dumps(out, indent=1))
    ok = all(out[f"{d}_psi"] == 100.0 for d in perms) and out.get("permutations_agree", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
