"""Norm weights folded into the next projections (issue 14, Build 2).

A thief multiplies a norm's weight (and LayerNorm bias) by ``c != 0`` per channel and divides
the readers' input columns by ``c`` (``--scale-norms``): the function is kept, the stream's and
the readers' cosines are not. ``verify`` folds such norms into their readers in both models
before comparing (``findlady_core.canon.norms``). Tiny random-init Llama (RMSNorm, untied head)
and GPT-2 (pre-LN, tied head) folders with specs derived from their ``config.json``.
"""

from __future__ import annotations

import pytest
import torch

from findlady_core import attack_steps
from findlady_core.canon.norms import fold, foldable_norms, scale_norms, unfold
from findlady_core.errors import InputError
from findlady_core.permute import psi
from findlady_core.report import reference_null, verify
from findlady_examples.tiny_folders import Folder

NORMS = {"llama": 5, "gpt2": 4}  # 2 per layer, and Llama's final norm (GPT-2's reads the tied table: left alone)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = {}
    for name in ("llama", "gpt2"):
        ref = Folder(name, tmp_path_factory.mktemp(name), 0)
        other = Folder(name, tmp_path_factory.mktemp(name + "-other"), 1)
        out[name] = (ref, other, reference_null(ref.sd, ref.spec, device="cpu"))
    return out


def _attack(f: Folder, sd, values, seed: int = 3):  # type: ignore[no-untyped-def]
    ctx = attack_steps.Context(f.spec, seed=seed, truth={g.name: torch.arange(g.size) for g in f.spec.groups})
    out, _ = attack_steps.run_pipeline(sd, {"permute": ["all"], **values}, ctx)
    return out, ctx.truth


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max() / b.abs().max()) < 1e-4


def _verify(ref: Folder, sus, null: float, **kw):  # type: ignore[no-untyped-def]
    return verify(ref.sd, sus, ref.spec, device="cpu", null_margin=null, **kw)


def _psi(ref: Folder, report, truth) -> float:  # type: ignore[no-untyped-def]
    recovered = {g["name"]: torch.tensor(g["permutation"]) for g in report["resync"]["groups"]}
    return psi(ref.spec, truth, recovered)[1]


def _folds(report):  # type: ignore[no-untyped-def]
    return [t for t in report["resync"]["transforms"] if t["kind"] == "norm_fold"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_scaled_norms_are_folded_away(folders, name: str) -> None:  # type: ignore[no-untyped-def]
    ref, other, null = folders[name]
    sus, truth = _attack(ref, ref.sd, {"scale_norms": True})
    assert _close(ref.logits(sus), ref.logits(ref.sd))  # function-preserving, permuted included
    norms = foldable_norms(ref.sd)
    assert len(norms) == NORMS[name]
    for n in norms:  # the attack did change every norm (a permutation alone would not change sorted values)
        assert not torch.allclose(sus[n.weight].sort().values, ref.sd[n.weight].sort().values)
    resynced = {}
    report = _verify(ref, sus, null, on_resynced=resynced.update)
    folds = _folds(report)
    assert sorted(t["norm"] for t in folds) == sorted(n.weight for n in norms)
    assert all(t["neurons"] == ref.cfg.hidden_size and t["residual"] < 1e-5 for t in folds), folds[:1]
    assert any(t["negative"] > 0 for t in folds)  # c < 0 is a symmetry too
    assert report["verdict"] == "match", report["reasons"]
    assert report["integrity"]["status"] == "intact"
    assert _psi(ref, report, truth) == 100.0
    # the re-synchronized suspect: the suspect's function, the reference's norm weights
    assert _close(ref.logits(resynced), ref.logits(ref.sd))
    for n in norms:
        assert torch.equal(resynced[n.weight], ref.sd[n.weight])
    # negative control: another seed under the same attack
    report = _verify(ref, _attack(other, other.sd, {"scale_norms": True})[0], null)
    assert report["verdict"] == "no_match", report["reasons"]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_scaled_norms_with_noise_as_good_as_noise_alone(folders, name: str) -> None:  # type: ignore[no-untyped-def]
    ref, _, null = folders[name]
    plain_sus, truth = _attack(ref, ref.sd, {"noise": 0.1})
    plain = _verify(ref, plain_sus, null)
    noisy_sus, truth2 = _attack(ref, ref.sd, {"noise": 0.1, "scale_norms": True})
    noisy = _verify(ref, noisy_sus, null)
    assert plain["verdict"] == noisy["verdict"] == "match_modified"
    assert len(_folds(noisy)) == NORMS[name] and not _folds(plain)
    assert _psi(ref, noisy, truth2) >= _psi(ref, plain, truth) - 1.0
    assert noisy["integrity"]["flagged_count"] <= plain["integrity"]["flagged_count"]


def test_nothing_is_folded_for_a_permuted_copy(folders) -> None:  # type: ignore[no-untyped-def]
    """Norm weights that are the reference's after the permutation: no fold, the re-synchronized
    suspect is the reference exactly."""
    ref, _, null = folders["llama"]
    sus, _ = _attack(ref, ref.sd, {})
    resynced = {}
    report = _verify(ref, sus, null, on_resynced=resynced.update)
    assert not _folds(report) and report["verdict"] == "match"
    assert all(torch.equal(resynced[k], v) for k, v in ref.sd.items())


def test_norm_values_permuted_against_the_stream_are_folded(folders) -> None:  # type: ignore[no-untyped-def]
    """A thief whose new norm weights are a permutation of the old ones (``c_i = g[pi(i)] / g[i]``):
    the cheap sorted-values check passes, the first pass's alignment shows the difference."""
    ref, _, null = folders["llama"]
    sd = dict(ref.sd)
    n = foldable_norms(sd)[1]
    g = sd[n.weight].double()
    c = g[torch.randperm(g.numel(), generator=torch.Generator().manual_seed(0))] / g
    sd[n.weight] = (g * c).to(torch.float32)
    for r in n.readers:
        sd[r.weight] = (sd[r.weight].double() / c).to(torch.float32)
    assert _close(ref.logits(sd), ref.logits(ref.sd))
    sus, truth = _attack(ref, sd, {})
    report = _verify(ref, sus, null)
    assert [t["norm"] for t in _folds(report)] == [n.weight]
    assert report["verdict"] == "match" and report["integrity"]["status"] == "intact"
    assert _psi(ref, report, truth) == 100.0


def test_fold_round_trip_and_refusals(folders) -> None:  # type: ignore[no-untyped-def]
    ref = folders["gpt2"][0]
    norms = foldable_norms(ref.sd)
    folded = fold(ref.sd, norms)
    assert _close(ref.logits(folded), ref.logits(ref.sd))  # folding alone keeps the function
    assert all(torch.equal(folded[n.weight], torch.ones_like(folded[n.weight])) for n in norms)
    back = unfold(folded, norms, ref.sd, {k: v.dtype for k, v in ref.sd.items()})
    assert all(torch.allclose(back[k], v, rtol=1e-6, atol=1e-7) for k, v in ref.sd.items())
    # a post-LN model has no norm that feeds only its readers: nothing folds, the attack refuses
    import transformers

    bert = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=24, vocab_size=30)).state_dict()
    assert foldable_norms(bert) == ()
    with pytest.raises(InputError, match="post-LayerNorm"):
        scale_norms(bert)


def test_cli_lists_scale_norms(capsys) -> None:  # type: ignore[no-untyped-def]
    """(Its refusal on a model without pre-norm: tests/test_obfuscation_modern.py.)"""
    from findlady_cli.main import main

    assert main(["attack", "--help"]) == 0
    assert "--scale-norms" in capsys.readouterr().out
