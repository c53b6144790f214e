"""Re-synchronization at scale: sketches of long members (confirmed exactly where margins are
close), streamed slices, memory-mapped inputs and a model written tensor by tensor."""

from __future__ import annotations

import pytest
import torch

from findlady_core import features, solver
from findlady_core.attacks import gaussian_noise, permute
from findlady_core.io import load_state_dict, save_state_dict
from findlady_core.permute import psi
from findlady_core.report import shuffled
from findlady_core.resync import resync
from findlady_core.spec import Group, Member, Spec

N, VOCAB, OUT = 256, 33_000, 48  # a group with a long member (sketched when wide enough: see below)


@pytest.fixture
def narrow_sketches(monkeypatch):
    """Sketch groups of N = 256 neurons (the default needs 1024, where folding pays on this CPU)."""
    monkeypatch.setattr(solver, "SKETCH_MIN_NEURONS", N)


def _model(seed: int = 0) -> tuple[dict[str, torch.Tensor], Spec]:
    g = torch.Generator().manual_seed(seed)
    sd = {"emb.weight": torch.randn(VOCAB, N, generator=g), "fc.weight": torch.randn(OUT, N, generator=g),
          "fc.bias": torch.randn(OUT, generator=g)}
    spec = Spec((Group("h", N, (Member("emb.weight", 1, role="out"), Member("fc.weight", 1, role="in"))),))
    return sd, spec


def test_a_sketch_finds_the_exact_assignment_and_says_so(narrow_sketches):
    sd, spec = _model()
    atk = permute(sd, spec, seed=1)
    sus = gaussian_noise(atk.state_dict, 0.1, targets=["emb.weight", "fc.weight"], seed=2)
    sketched = resync(sd, sus, spec, device="cpu")
    exact = resync(sd, sus, spec, device="cpu", sketch=False)
    assert sketched.sketched >= 1 and sketched.confirmed == 0  # margins far beyond the sketch's error
    assert exact.sketched == exact.confirmed == 0
    assert psi(spec, atk.truth, sketched.permutations)[1] == 100.0
    assert torch.equal(sketched.permutations["h"], exact.permutations["h"])
    # matched similarities are exact; margins stand on sketched alternatives: close, not equal
    assert sketched.groups[0].mean_similarity == pytest.approx(exact.groups[0].mean_similarity, abs=1e-5)
    diff = (sketched.groups[0].margins - exact.groups[0].margins).abs()
    assert 0 < float(diff.max()) < 0.05


def test_an_mlp_wider_than_its_features_is_sketched():
    """An MLP-like group (1024 neurons, 2 x 768 values each: fewer features than neurons) is
    compared on a 512-bucket sketch at the default thresholds, and finds the exact assignment."""
    g = torch.Generator().manual_seed(8)
    n, h = 1024, 768
    sd = {"up.weight": torch.randn(n, h, generator=g), "up.bias": torch.randn(n, generator=g),
          "down.weight": torch.randn(h, n, generator=g)}
    spec = Spec((Group("mlp", n, (Member("up.weight", 0, role="out"), Member("up.bias", 0, role="out"),
                                  Member("down.weight", 1, role="in"))),))
    assert features.sketch_width(2 * h) == 512
    atk = permute(sd, spec, seed=9)
    sus = gaussian_noise(atk.state_dict, 0.1, targets=["up.weight", "down.weight"], seed=10)
    sketched = resync(sd, sus, spec, device="cpu")
    exact = resync(sd, sus, spec, device="cpu", sketch=False)
    assert (sketched.sketched, sketched.confirmed) == (1, 0)
    assert psi(spec, atk.truth, sketched.permutations)[1] == 100.0
    assert torch.equal(sketched.permutations["mlp"], exact.permutations["mlp"])
    assert sketched.groups[0].mean_similarity == pytest.approx(exact.groups[0].mean_similarity, abs=1e-5)


@pytest.mark.parametrize("keep", [features.KEEP_ELEMS, 0])
def test_matched_similarities_are_exact_kept_or_read_again(keep):
    """``Sketch.matched`` gives each pair's exact ``D * cosine``, from the slices it kept or
    from the member read again, for a member wider than the sketch and for one narrower."""
    g = torch.Generator().manual_seed(11)
    n = 300
    parts = {0: (torch.randn(n, 900, generator=g), torch.randn(n, 900, generator=g)),
             1: (torch.randn(n, 200, generator=g), torch.randn(n, 200, generator=g))}
    p = torch.randperm(n, generator=g)

    def again(seed):
        a, b = parts[seed]
        return iter([a[:, :150], a[:, 150:]]), iter([b[:, :150], b[:, 150:]])

    sk = features.Sketch(n, 512, torch.device("cpu"), keep=keep)
    for seed in parts:
        sk.add(*again(seed), seed=seed, width=parts[seed][0].shape[1])
    want = sum(torch.nn.functional.cosine_similarity(a, b[p], dim=1) * a.shape[1] for a, b in parts.values())
    torch.testing.assert_close(sk.matched(p, again), want, rtol=1e-5, atol=1e-4)
    # the sketch itself: unrelated rows near 0, within the error bound's reach
    est = sk.similarity() / sk.weight
    assert float(est.abs().max()) < 12 * sk.error


def test_close_margins_are_confirmed_on_exact_features(narrow_sketches):
    """A structureless suspect gives margins near 0: the sketched solve is redone exactly, so
    the outcome is the exact solver's, to the last neuron."""
    sd, spec = _model()
    noise = shuffled(sd, seed=3)
    sketched = resync(sd, noise, spec, device="cpu")
    exact = resync(sd, noise, spec, device="cpu", sketch=False)
    assert sketched.confirmed >= 1
    assert torch.equal(sketched.permutations["h"], exact.permutations["h"])
    assert torch.allclose(sketched.groups[0].margins, exact.groups[0].margins, atol=1e-5)


def test_streamed_slices_equal_the_one_shot_product(monkeypatch):
    """Members are read in slices of CHUNK_ELEMS values: with tiny slices the similarity is
    the same as with one slice."""
    sd, spec = _model()
    sus = permute(sd, spec, seed=4).state_dict
    whole = resync(sd, sus, spec, device="cpu", sketch=False, keep_similarities=True)
    monkeypatch.setattr(features, "CHUNK_ELEMS", 4096)
    from findlady_core import solver

    monkeypatch.setattr(solver, "CHUNK_ELEMS", 4096)
    sliced = resync(sd, sus, spec, device="cpu", sketch=False, keep_similarities=True)
    assert torch.equal(whole.permutations["h"], sliced.permutations["h"])
    torch.testing.assert_close(sliced.similarities["h"], whole.similarities["h"], rtol=1e-5, atol=1e-5)


def test_bf16_model_mapped_resynced_and_written_tensor_by_tensor(tmp_path):
    sd, spec = _model()
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    atk = permute(sd, spec, seed=5)
    save_state_dict(sd, tmp_path / "ref.safetensors")
    save_state_dict(atk.state_dict, tmp_path / "sus.safetensors")
    ref = load_state_dict(tmp_path / "ref.safetensors", mmap=True)
    sus = load_state_dict(tmp_path / "sus.safetensors", mmap=True)
    r = resync(ref, sus, spec, device="cpu")
    assert psi(spec, atk.truth, r.permutations)[1] == 100.0
    r.state_dict.save(tmp_path / "out.safetensors")
    out = load_state_dict(tmp_path / "out.safetensors")
    assert set(out) == set(sd)
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], sd[k]) for k in sd)


def test_bert_large_heads_solve_without_invariant_summaries():
    """With 16 heads of hidden 1024, the heads group has 4096 values per neuron aligned on the
    residual stream but none in full (its dims groups are unresolved): it must still be solved
    (it used to fail on an empty similarity)."""
    transformers = __import__("pytest").importorskip("transformers")
    from findlady_core.catalog import bert_spec

    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16,
                                  intermediate_size=64, vocab_size=40, max_position_embeddings=8)
    sd = {k: v.detach().clone() for k, v in transformers.BertModel(cfg).state_dict().items() if v.is_floating_point()}
    spec = bert_spec(sd, num_heads=16)
    atk = permute(sd, spec, seed=6)
    r = resync(sd, atk.state_dict, spec, device="cpu")
    assert psi(spec, atk.truth, r.permutations)[1] == 100.0


def test_margins_equal_the_top_two_definition():
    """The fast margins (maxima with the matched entries masked) equal the top-2 definition,
    for a bijection and for an argmax that is not one; the matrix is left as it was."""
    from findlady_core.solver import margins

    g = torch.Generator().manual_seed(7)
    s = torch.randn(50, 50, generator=g)
    before = s.clone()
    for p in (torch.randperm(50, generator=g), s.argmax(dim=1)):
        n, idx = 50, torch.arange(50)
        rv, ri = s.topk(2, dim=1)
        row_alt = torch.where(ri[:, 0] == p, rv[:, 1], rv[:, 0])
        cv, ci = s.topk(2, dim=0)
        col_alt = torch.where(ci[0, p] == idx, cv[1, p], cv[0, p])
        assert torch.equal(margins(s, p), s[idx, p] - torch.maximum(row_alt, col_alt)), n
        assert torch.equal(s, before)
