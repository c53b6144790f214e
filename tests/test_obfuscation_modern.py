"""Obfuscation of modern blocks (issue 14, second part): head maps under grouped-query attention
and rotary embeddings (Llama) and in GPT-2's fused ``c_attn``, scalings on linear paths
(SwiGLU's up with down) and of a conv channel through its BatchNorm statistics.

Tiny random-init transformers folders (``save_pretrained``), specs derived from their
``config.json`` (``findlady_core.derive``). Every attack keeps the logits; ``verify`` must undo
it (listed in ``resync.transforms``), say ``match`` with integrity intact, and still say
``no_match`` for a model of another seed under the same attack.
"""

from __future__ import annotations

import pytest
import torch

from findlady_core import attack_steps
from findlady_core.canon.attention import attention_layers
from findlady_core.report import reference_null, verify
from findlady_examples.tiny_folders import HEADS, KV, H, Folder

@pytest.fixture(scope="module")
def folders(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = {}
    for name in ("llama", "gpt2", "phi", "resnet"):
        ref = Folder(name, tmp_path_factory.mktemp(name), 0)
        other = Folder(name, tmp_path_factory.mktemp(name + "-other"), 1)
        out[name] = (ref, other, reference_null(ref.sd, ref.spec, device="cpu"))
    return out


def _attack(f: Folder, sd, values, seed: int = 3):  # type: ignore[no-untyped-def]
    ctx = attack_steps.Context(f.spec, seed=seed, truth={g.name: torch.arange(g.size) for g in f.spec.groups})
    out, _ = attack_steps.run_pipeline(sd, {"permute": ["all"], **values}, ctx)
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max() / b.abs().max()) < 1e-4


def test_heads_are_found_in_derived_specs(folders) -> None:  # type: ignore[no-untyped-def]
    llama = attention_layers(folders["llama"][0].spec)
    assert [(L.kv_heads, L.group_size, L.head_dim, L.qk) for L in llama] == [(KV, HEADS // KV, H // HEADS, "rotary")] * 2
    assert all(None not in L.query_groups for L in llama)  # query heads move inside their kv head
    gpt2 = attention_layers(folders["gpt2"][0].spec)
    assert [(L.kv_heads, L.group_size, L.qk, L.q.tensor == L.k.tensor == L.v.tensor) for L in gpt2] == \
        [(HEADS, 1, "general", True)] * 2  # fused c_attn: q, k, v at three offsets of one tensor


def test_partial_rotary_maps_only_the_dims_rotary_leaves_alone(folders) -> None:  # type: ignore[no-untyped-def]
    """Phi rotates the first half of each head's q/k dims: rotation-scalings there, any map on the
    rest. A general A over the whole head (what a spec permuting those dims once suggested) is
    no symmetry: it changes the logits."""
    from findlady_core.obfuscate import _random_map

    ref = folders["phi"][0]
    layers = attention_layers(ref.spec)
    hd = 2 * H // HEADS
    assert [(L.qk, L.head_dim, L.rotary_dim) for L in layers] == [("rotary", hd, hd // 2)] * 2
    L = layers[0]
    sd = {k: v.double().clone() for k, v in ref.sd.items()}
    L.map_qk(sd, 0, _random_map(hd, "general", torch.Generator().manual_seed(0)))
    assert not _close(ref.logits({k: v.float() for k, v in sd.items()}), ref.logits(ref.sd))
    sd = {k: v.double().clone() for k, v in ref.sd.items()}
    L.map_qk(sd, 0, _random_map(hd, "general", torch.Generator().manual_seed(0), rotary_dim=L.rotary_dim))
    assert _close(ref.logits({k: v.float() for k, v in sd.items()}), ref.logits(ref.sd))


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi"])
@pytest.mark.parametrize("kind", ["orthogonal", "general"])
def test_head_maps_are_undone(folders, name: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    ref, other, null = folders[name]
    sus = _attack(ref, ref.sd, {"head_maps": kind})
    assert _close(ref.logits(sus), ref.logits(ref.sd))  # function-preserving, permuted included
    report = verify(ref.sd, sus, ref.spec, device="cpu", null_margin=null)
    maps = [t for t in report["resync"]["transforms"] if t["kind"] == "head_map"]
    kv = KV if name == "llama" else HEADS  # Phi and GPT-2: multi-head attention
    assert len(maps) == 2 * kv * 2, maps[:2]  # q/k and v/o of every kv head of both layers
    assert max(t["residual"] for t in maps) < 1e-4
    assert report["verdict"] == "match", report["reasons"]
    assert report["integrity"]["status"] == "intact"
    # negative control: another seed under the same attack
    report = verify(ref.sd, _attack(other, other.sd, {"head_maps": kind}), ref.spec, device="cpu", null_margin=null)
    assert report["verdict"] == "no_match", report["reasons"]
    assert not [t for t in report["resync"]["transforms"] if t["kind"] == "head_map"]


def test_a_general_qk_map_is_no_symmetry_under_rotary(folders) -> None:  # type: ignore[no-untyped-def]
    """Why rotary layers only get rotation-scalings: a general A on q/k changes the logits."""
    from findlady_core.obfuscate import _random_map

    ref = folders["llama"][0]
    L = attention_layers(ref.spec)[0]
    sd = {k: v.double().clone() for k, v in ref.sd.items()}
    L.map_qk(sd, 0, _random_map(L.head_dim, "general", torch.Generator().manual_seed(0)))
    assert not _close(ref.logits({k: v.float() for k, v in sd.items()}), ref.logits(ref.sd))


@pytest.mark.parametrize("name", ["llama", "resnet"])
def test_linear_path_scales_are_undone(folders, name: str) -> None:  # type: ignore[no-untyped-def]
    """SwiGLU's up with down (Llama), conv channels through BatchNorm (ResNet): any c != 0."""
    ref, other, null = folders[name]
    sus = _attack(ref, ref.sd, {"scale_linear": True})
    assert _close(ref.logits(sus), ref.logits(ref.sd))
    report = verify(ref.sd, sus, ref.spec, device="cpu", null_margin=null)
    scales = [t for t in report["resync"]["transforms"] if t["kind"] == "scale" and "path" in t]
    assert scales and all(t["residual"] < 1e-4 for t in scales), scales[:1]
    assert any(f < 0 for t in scales for f in t["factors"])  # negative factors too: no activation in between
    n_units = 2 if name == "llama" else sum(1 for k in ref.sd if k.endswith("running_mean"))
    assert len(scales) == n_units
    assert report["verdict"] == "match", report["reasons"]
    assert report["integrity"]["status"] == "intact"
    report = verify(ref.sd, _attack(other, other.sd, {"scale_linear": True}), ref.spec, device="cpu", null_margin=null)
    assert report["verdict"] == "no_match", report["reasons"]
    assert not [t for t in report["resync"]["transforms"] if t["kind"] == "scale" and "path" in t]


def test_llama_combination_with_noise(folders) -> None:  # type: ignore[no-untyped-def]
    """Head maps and SwiGLU scales together; with noise 0.1 the copy is recovered as well as
    with noise alone (a real change: ``match_modified``)."""
    ref, _, null = folders["llama"]
    combo = {"head_maps": "general", "scale_linear": True}
    sus = _attack(ref, ref.sd, combo)
    assert _close(ref.logits(sus), ref.logits(ref.sd))
    report = verify(ref.sd, sus, ref.spec, device="cpu", null_margin=null)
    assert report["verdict"] == "match", report["reasons"]
    plain = verify(ref.sd, _attack(ref, ref.sd, {"noise": 0.1}), ref.spec, device="cpu", null_margin=null)
    noisy = verify(ref.sd, _attack(ref, ref.sd, {"noise": 0.1, **combo}), ref.spec, device="cpu", null_margin=null)
    assert plain["verdict"] == noisy["verdict"] == "match_modified"
    assert {"head_map", "scale"} <= {t["kind"] for t in noisy["resync"]["transforms"]}
    assert noisy["resync"]["similarity"]["mean_margin"] >= 0.8 * plain["resync"]["similarity"]["mean_margin"]


@pytest.mark.parametrize(("flag", "reason"), [("--scale-linear", "no SwiGLU block"), ("--scale-norms", "no norm to rescale")])
def test_cli_refuses_a_symmetry_the_model_lacks(trained_mlp, tmp_path, capsys, flag: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    """An MLP has no SwiGLU, no BatchNorm and no pre-norm: the flag is refused with the reason (exit 2)."""
    from findlady_cli.main import main
    from findlady_core.io import save_state_dict
    from findlady_core.trace import trace_spec
    from findlady_examples import models

    save_state_dict(trained_mlp[1], tmp_path / "ref.safetensors")
    trace_spec(models.build("mlp"), models.example_input("mlp")).save(tmp_path / "spec.json")
    code = main(["attack", str(tmp_path / "ref.safetensors"), "-o", str(tmp_path / "x.safetensors"), "--spec",
                 str(tmp_path / "spec.json"), flag])
    assert code == 2
    assert reason in capsys.readouterr().err


def test_timings_account_for_the_whole_verification(folders) -> None:  # type: ignore[no-untyped-def]
    """The fits between the solver's passes count as resync; storing the re-synchronized model
    and drawing the pictures have their own entries: the parts add up to the call."""
    import time

    ref, _, null = folders["llama"]
    sus = _attack(ref, ref.sd, {"head_maps": "general"})
    t0 = time.perf_counter()
    report = verify(ref.sd, sus, ref.spec, device="cpu", null_margin=null,
                    on_resynced=lambda sd: time.sleep(0.2), evidence=lambda r, integ: time.sleep(0.3))
    wall = time.perf_counter() - t0
    t = report["timings"]
    assert t["write"] >= 0.2 and t["visuals"] >= 0.3
    assert t["resync"] >= report["resync"]["seconds"]  # the solver's passes and the head-map fits
    assert sum(t.values()) >= 0.8 * wall, (t, wall)
