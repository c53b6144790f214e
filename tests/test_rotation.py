"""Residual-stream rotations: folding and rotating keep the logits, Procrustes finds Q, the
undo puts a rotated, permuted, noisy copy back in the reference's basis (verdict and watermark
as for noise alone), models of other seeds are refused, and the CLI attack and verify work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from findlady_core import attack_steps, attacks
from findlady_core.errors import InputError
from findlady_core.io import save_state_dict
from findlady_core.report import verify
from findlady_core.rotation import (
    ROTATION_THRESHOLD, estimate_rotation, family_from_config, fold, random_rotation, rotate, rotate_residual,
    undo_rotation,
)
from findlady_core.watermark import WatermarkKey, detect, generate_key
from findlady_examples import tiny_transformers as tt

KINDS = ("llama", "gpt2")
# Llama's RMSNorm computes in float32 inside transformers, whatever the model's dtype
LOGIT_TOL = {"llama": 1e-6, "gpt2": 1e-9}
WM_LAYER = {"llama": "model.layers.0.self_attn.q_proj.weight", "gpt2": "transformer.h.0.mlp.c_proj.weight"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def family(kind: str, sd: dict[str, torch.Tensor]):
    return family_from_config(tt.CONFIGS[kind]().to_dict(), sd.keys())


@pytest.fixture(scope="module", params=KINDS)
def model(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.Tensor]]:
    return request.param, tt.state_dict(request.param, 0)


def watermarked(kind: str, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], WatermarkKey]:
    """The owner's model: a 32-bit Uchida key on a weight whose mean over axis 0 (the
    key's ``mean_out``) is a stream vector. Llama: q_proj (out, in), its input side. GPT-2's
    Conv1D weights are stored (in, out): mlp.c_proj (4d, d) averaged over its MLP inputs gives
    the stream side it writes."""
    layer = WM_LAYER[kind]
    W = sd[layer]
    key = generate_key(layer, sd, bits=32, seed=7)
    # the smallest change of W's mean that reads every bit with a margin of 0.01 (noise 0.1
    # moves X w by about 0.002 here), added to every row: a strong, small watermark
    X, w0 = key.X.double(), W.mean(0)
    target = 0.01 * (2 * key.bits.double() - 1)
    delta = X.T @ torch.linalg.solve(X @ X.T, target - X @ w0)
    out = dict(sd)
    out[layer] = W + delta.view(1, -1)
    assert detect(out, key)["bit_errors"] == 0
    return out, key


# ------------------------------------------------------------------ function preserving


def test_fold_keeps_logits_and_leaves_plain_norms(model) -> None:
    kind, sd = model
    fam = family(kind, sd)
    folded = fold(sd, fam)
    assert rel(tt.logits(kind, folded, tied=False), tt.logits(kind, sd)) <= LOGIT_TOL[kind]
    for norm in fam.norms:
        assert torch.equal(folded[norm.weight], torch.ones_like(sd[norm.weight]))
        assert not torch.equal(sd[norm.weight], folded[norm.weight])  # the fixture's norms are not ones


def test_rotation_keeps_logits_and_scrambles_every_stream_weight(model) -> None:
    kind, sd = model
    fam = family(kind, sd)
    rotated, Q = rotate_residual(sd, fam, seed=3)
    assert rel(tt.logits(kind, rotated, tied=False), tt.logits(kind, sd)) <= LOGIT_TOL[kind]
    assert float((Q @ Q.T - torch.eye(fam.hidden, dtype=Q.dtype)).abs().max()) < 1e-12
    folded = fold(sd, fam)
    for name, _ in fam.stream:
        if folded[name].dim() == 2:  # nothing of the weight is left in place
            assert rel(rotated[name], folded[name]) > 0.5, name


def test_layernorm_needs_a_rotation_fixing_the_ones_vector() -> None:
    sd = tt.state_dict("gpt2", 0)
    fam = family("gpt2", sd)
    Q = random_rotation(fam.hidden, seed=3, fix_ones=True)
    ones = torch.ones(fam.hidden, dtype=torch.float64)
    assert float((Q @ ones - ones).abs().max()) < 1e-12
    general = rotate(fold(sd, fam), fam, random_rotation(fam.hidden, seed=3, fix_ones=False))
    assert rel(tt.logits("gpt2", general, tied=False), tt.logits("gpt2", sd)) > 0.01


def test_post_ln_and_unknown_families_are_refused() -> None:
    with pytest.raises(InputError, match="post-LayerNorm.*no rotation symmetry"):
        family_from_config({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2}, [])
    with pytest.raises(InputError, match="not supported for model_type 't5'"):
        family_from_config({"model_type": "t5"}, [])
    config = tt.llama_config().to_dict()
    with pytest.raises(InputError, match="config says 1000000000 layers, the weights hold 2"):
        family_from_config({**config, "num_hidden_layers": 10**9}, tt.state_dict("llama", 0))
    with pytest.raises(InputError, match="config says 1 layers, the weights hold 2"):
        family_from_config({**config, "num_hidden_layers": 1}, tt.state_dict("llama", 0))
    sd = tt.state_dict("llama", 0)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(InputError, match="up_proj.weight"):
        rotate_residual(sd, family("llama", tt.state_dict("llama", 0)), seed=0)


# ------------------------------------------------------------------ estimate and undo


def test_procrustes_recovers_Q_and_the_undo_gives_the_reference_back(model) -> None:
    kind, sd = model
    fam = family(kind, sd)
    rotated, Q = rotate_residual(sd, fam, seed=3)
    est = estimate_rotation(sd, rotated, fam)
    assert est.applied and not est.permutation_like
    assert float((est.Q - Q).abs().max()) < 1e-10
    assert est.residual < 1e-10
    assert set(est.state_dict) == set(sd)  # a tied head the reference stores once is left out again
    assert max(float((est.state_dict[k] - sd[k]).abs().max()) for k in sd) < 1e-10


def test_a_permuted_stream_is_one_Q_too(model) -> None:
    kind, sd = model
    fam = family(kind, sd)
    permuted = attacks.permute(sd, tt.SPECS[kind](), ["stream"], seed=2).state_dict
    est = estimate_rotation(sd, permuted, fam)
    assert est.applied and est.permutation_like  # Q is the permutation matrix itself
    assert max(float((est.state_dict[k] - sd[k]).abs().max()) for k in sd) < 1e-10


def test_the_layernorm_fit_keeps_the_ones_vector_fixed() -> None:
    sd = tt.state_dict("gpt2", 0)
    fam = family("gpt2", sd)
    noisy = _suspect(sd, "gpt2", rotate_it=True, noise=0.3)["state_dict"]
    Q = estimate_rotation(sd, noisy, fam).Q
    ones = torch.ones(fam.hidden, dtype=torch.float64)
    assert float((Q @ ones - ones).abs().max()) < 1e-12


def _suspect(sd: dict[str, torch.Tensor], kind: str, *, rotate_it: bool, noise: float, seed: int = 3) -> dict:
    values = {"permute": ["all"], "noise": noise, "rotate_residual": "(config)" if rotate_it else None}
    spec = tt.SPECS[kind]()
    ctx = attack_steps.Context(spec, seed=seed, truth={g.name: torch.arange(g.size) for g in spec.groups})
    out = dict(sd)
    for a in attack_steps.pipeline(values):
        if a.name == "rotate_residual":  # the registered step reads a config file; here the family is at hand
            out, _ = rotate_residual(out, family(kind, sd), seed=seed)
            attack_steps._reset_stream_truth(ctx, family(kind, sd))
        else:
            out, _ = a.run(out, values, ctx)
    return {"state_dict": out, "truth": ctx.truth}


@pytest.fixture(scope="module")
def reports(model):
    """verify on a permuted + noise 0.1 copy, and on a permuted + rotated + noise 0.1 copy."""
    kind, sd = model
    ref, key = watermarked(kind, sd)
    spec, fam = tt.SPECS[kind](), family(kind, ref)
    plain = _suspect(ref, kind, rotate_it=False, noise=0.1)
    rot = _suspect(ref, kind, rotate_it=True, noise=0.1)
    return {
        "kind": kind,
        "noise": verify(ref, plain["state_dict"], spec, key=key, device="cpu"),
        "rotated": verify(ref, rot["state_dict"], spec, key=key, device="cpu", rotation=fam),
        "truth": rot["truth"],
    }


def test_a_rotated_permuted_noisy_copy_is_judged_as_noise_alone(reports) -> None:
    noise, rotated = reports["noise"], reports["rotated"]
    assert noise["verdict"] == "match_modified"  # noise on every tensor: modified neurons
    assert rotated["verdict"] == noise["verdict"]
    (t,) = rotated["resync"]["transforms"]
    assert t["kind"] == "rotation" and t["group"] == "stream" and t["neurons"] == tt.HIDDEN
    assert t["residual"] <= ROTATION_THRESHOLD and not t["permutation_like"]
    assert "rotation was found and undone" in rotated["reasons"][0]


def test_after_the_undo_no_permutation_is_left_on_the_stream(reports) -> None:
    groups = {g["name"]: g for g in reports["rotated"]["resync"]["groups"]}
    assert groups["stream"]["moved"] == 0
    for name, p in reports["truth"].items():  # the MLP neurons are re-synchronized as usual
        assert groups[name]["permutation"] == p.tolist(), name


def test_the_watermark_on_a_stream_side_weight_is_read_after_the_undo(reports) -> None:
    noise, rotated = reports["noise"]["watermark"], reports["rotated"]["watermark"]
    assert rotated["detected"] and rotated["bit_errors"] == noise["bit_errors"]
    assert rotated["bit_errors_before_resync"] > 8  # the rotation had scrambled it (32 bits)


def test_without_the_undo_the_rotated_copy_is_not_recognised(model) -> None:
    kind, sd = model
    ref, key = watermarked(kind, sd)
    rot = _suspect(ref, kind, rotate_it=True, noise=0.1)["state_dict"]
    rot = {k: v for k, v in rot.items() if k in ref}  # the untied head, which the plain check would refuse
    report = verify(ref, rot, tt.SPECS[kind](), key=key, device="cpu")
    assert report["verdict"] != "match"
    assert not report["watermark"]["detected"] and report["watermark"]["bit_errors"] >= 8


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_other_seed_models_under_the_fit_are_refused(model, seed: int) -> None:
    kind, sd = model
    fam = family(kind, sd)
    other, _ = rotate_residual(tt.state_dict(kind, seed), fam, seed=seed)
    est = estimate_rotation(sd, other, fam)
    assert not est.applied and est.residual > 0.9  # far above the threshold (0.5)
    assert undo_rotation(sd, other, fam)[1] is None
    report = verify(sd, est.state_dict, tt.SPECS[kind](), device="cpu", rotation=fam)
    assert report["verdict"] == "no_match"
    assert not [t for t in report["resync"].get("transforms", []) if t["kind"] == "rotation"]
    assert "no residual-stream rotation could be estimated" in report["reasons"][0]


def test_heavy_noise_falls_back_and_never_matches(model) -> None:
    kind, sd = model
    sus = _suspect(sd, kind, rotate_it=True, noise=1.5)["state_dict"]
    report = verify(sd, sus, tt.SPECS[kind](), device="cpu", rotation=family(kind, sd))
    assert not [t for t in report["resync"].get("transforms", []) if t["kind"] == "rotation"]
    assert "the permutation result stands" in report["reasons"][0]
    assert report["verdict"] != "match"


def test_too_few_table_rows_fall_back_and_say_so() -> None:
    sd = tt.state_dict("llama", 0)
    fam = family("llama", sd)
    small = {k: (v[:50] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in sd.items()}
    rotated, _ = rotate_residual(small, fam, seed=1)
    est = estimate_rotation(small, rotated, fam)
    assert not est.applied and est.state_dict is not rotated and torch.equal(est.state_dict["lm_head.weight"],
                                                                            rotated["lm_head.weight"])
    assert "100 rows for a 64-dimensional stream, too few to fit a rotation" in est.reason()


# ------------------------------------------------------------------ CLI


def test_cli_attack_rotate_residual_then_verify_undo_rotation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from findlady_cli.main import main

    sd = tt.state_dict("llama", 0)
    ref, config, spec, sus, truth = (tmp_path / n for n in ("ref.safetensors", "config.json", "spec.json",
                                                             "sus.safetensors", "truth.json"))
    save_state_dict(sd, ref)
    config.write_text(tt.llama_config().to_json_string())
    tt.llama_spec().save(spec)
    assert main(["attack", str(ref), "-o", str(sus), "--spec", str(spec), "--permute", "all", "--rotate-residual",
                 str(tmp_path), "--noise", "0.1", "--seed", "4", "--truth", str(truth), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any("rotated the 64-dimensional residual stream of llama" in s for s in out["steps"])
    assert out["moved"]["stream"] == 0  # undoing Q restores the stream's order too
    code = main(["verify", str(ref), str(sus), "--spec", str(spec), "--undo-rotation", str(config), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verdict"] == "match_modified"
    assert [t["kind"] for t in report["resync"]["transforms"]] == ["rotation"]
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2}))
    assert main(["attack", str(ref), "-o", str(tmp_path / "x.safetensors"), "--spec", str(spec),
                 "--rotate-residual", str(bert)]) == 2
    assert "post-LayerNorm" in capsys.readouterr().err
