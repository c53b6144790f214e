"""Uchida watermark: key format, embedding, extraction, the binomial verdict, and the
permutation attack the paper counters (input channels scramble the key, outputs do not)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import binom
from torch.func import functional_call

from findlady_core.errors import KeyFileError
from findlady_core.permute import apply_permutations
from findlady_core.spec import Group, Member, Spec
from findlady_examples import train
from findlady_core.watermark import (
    MAX_BITS,
    WatermarkKey,
    binomial_tail,
    check_key,
    detect,
    embed_loss,
    embedded_vector,
    extract_bits,
    generate_key,
    load_key,
    save_key,
)

CONV = (32, 16, 3, 3)


def test_generate_key_shapes_and_seed() -> None:
    k = generate_key("conv2.weight", CONV, bits=64, seed=7)
    assert k.X.shape == (64, 16 * 9) and k.X.dtype == torch.float32
    assert k.bits.shape == (64,) and k.bits.dtype == torch.uint8 and set(k.bits.tolist()) == {0, 1}
    again = generate_key("conv2.weight", {"conv2.weight": torch.zeros(CONV)}, bits=64, seed=7)
    assert torch.equal(k.X, again.X) and torch.equal(k.bits, again.bits)
    assert not torch.equal(k.X, generate_key("conv2.weight", CONV, bits=64, seed=8).X)
    assert generate_key("fc.weight", (10, 50), bits=8, seed=0).X.shape == (8, 50)
    with pytest.raises(KeyFileError, match="2-D .* or 4-D"):
        generate_key("bias", (32,), seed=0)


def test_embedded_vector_is_the_mean_over_output_neurons() -> None:
    w = torch.randn(CONV)
    assert torch.equal(embedded_vector(w), w.mean(0).flatten())
    lin = torch.randn(5, 7)
    assert torch.allclose(embedded_vector(lin), lin.sum(0) / 5)
    k = generate_key("l", (5, 7), bits=16, seed=0)
    assert torch.equal(extract_bits(lin, k), (k.X.double() @ lin.double().mean(0) > 0).to(torch.uint8))


def test_key_round_trips_through_a_file(tmp_path: Path) -> None:
    k = generate_key("conv2.weight", CONV, bits=64, seed=1)
    save_key(k, tmp_path / "k.safetensors")
    back = load_key(tmp_path / "k.safetensors")
    assert torch.equal(back.X, k.X) and torch.equal(back.bits, k.bits)
    assert (back.layer, back.flatten) == ("conv2.weight", "mean_out")


def _meta(**over: str | None) -> dict[str, str]:
    m = {"scheme": "uchida", "layer": "conv2.weight", "flatten": "mean_out"}
    for k, v in over.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    return m


X = torch.randn(8, 144)
B = torch.randint(0, 2, (8,), dtype=torch.uint8)
NAN_X = X.clone()
NAN_X[3, 5] = float("nan")


@pytest.mark.parametrize(
    ("tensors", "meta", "message"),
    [
        ({"X": X.flatten(), "bits": B}, _meta(), "2-D float32"),
        ({"X": X.double(), "bits": B}, _meta(), "2-D float32"),
        ({"X": X, "bits": B.long()}, _meta(), "1-D uint8"),
        ({"X": X, "bits": B[:5]}, _meta(), "5 bits but X has 8 rows"),
        ({"X": X, "bits": B + 1}, _meta(), "0 or 1"),
        ({"X": NAN_X, "bits": B}, _meta(), "(?i)nan"),
        ({"X": X}, _meta(), "lacks tensor.*bits"),
        ({"X": X, "bits": B, "extra": B.clone()}, _meta(), "unexpected tensor.*extra"),
        ({"X": X, "bits": B}, _meta(scheme=None), "lacks 'scheme'"),
        ({"X": X, "bits": B}, _meta(layer=None), "lacks 'layer'"),
        ({"X": X, "bits": B}, _meta(flatten=None), "lacks 'flatten'"),
        ({"X": X, "bits": B}, _meta(scheme="rigamonti"), "unsupported watermark scheme"),
        ({"X": X, "bits": B}, _meta(flatten="sum_in"), "unsupported key flatten"),
        ({"X": torch.zeros(MAX_BITS + 1, 1), "bits": torch.zeros(MAX_BITS + 1, dtype=torch.uint8)}, _meta(), "limit"),
    ],
)
def test_malformed_keys_are_refused(tmp_path: Path, tensors: dict, meta: dict, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    with pytest.raises(KeyFileError, match=message):
        load_key(path)


def test_non_safetensors_and_oversized_key_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x80\x04not a key at all" * 10)
    with pytest.raises(KeyFileError, match="not a valid safetensors"):
        load_key(junk)
    with pytest.raises(KeyFileError, match="cannot read key"):
        load_key(tmp_path / "missing")
    good = tmp_path / "k"
    save_key(generate_key("l", (4, 100), bits=64, seed=0), good)
    with pytest.raises(KeyFileError, match="more than the limit"):
        load_key(good, max_bytes=1000)


def test_check_key_refuses_keys_that_do_not_fit() -> None:
    sd = {"conv2.weight": torch.randn(CONV), "conv2.bias": torch.randn(32), "steps": torch.zeros(3, 3, dtype=torch.int64)}
    key = generate_key("conv2.weight", CONV, bits=16, seed=0)
    check_key(key, sd)
    with pytest.raises(KeyFileError, match="does not have"):
        check_key(key, {"other": torch.zeros(CONV)})
    with pytest.raises(KeyFileError, match="gives 72"):
        check_key(key, {"conv2.weight": torch.zeros(32, 8, 3, 3)})
    with pytest.raises(KeyFileError, match="2-D .* or 4-D"):
        check_key(WatermarkKey(torch.randn(4, 1), torch.zeros(4, dtype=torch.uint8), "conv2.bias"), sd)
    with pytest.raises(KeyFileError, match="not floating"):
        check_key(WatermarkKey(torch.randn(4, 3), torch.zeros(4, dtype=torch.uint8), "steps"), sd)
    spec = Spec((Group("conv2", 32, (Member("conv2.weight", 0), Member("conv2.bias", 0))),))
    check_key(key, sd, spec)
    other = Spec((Group("b", 32, (Member("conv2.bias", 0),)),))
    with pytest.raises(KeyFileError, match="key is for layer conv2.weight which the spec does not cover"):
        check_key(key, sd, other)


def test_binomial_tail_is_exact_even_when_p_underflows() -> None:
    for e, t in [(0, 64), (3, 64), (20, 64), (32, 64)]:
        p, lg = binomial_tail(e, t)
        assert p == pytest.approx(binom.cdf(e, t, 0.5), rel=1e-9)
        assert lg == pytest.approx(math.log10(binom.cdf(e, t, 0.5)), rel=1e-9)
    p, lg = binomial_tail(0, 5000)
    assert p == 0.0 and lg == pytest.approx(-5000 * math.log10(2), rel=1e-12)
    _, lg = binomial_tail(100, 20000)  # sum of 101 tiny terms, dominated by the last one
    assert lg == pytest.approx(binom.logpmf(100, 20000, 0.5) / math.log(10), rel=1e-3)


def test_embed_loss_drives_the_extracted_bits_to_the_key() -> None:
    torch.manual_seed(0)
    w = (0.05 * torch.randn(20, 30)).requires_grad_()
    key = generate_key("fc.weight", (20, 30), bits=24, seed=3)
    start = int((extract_bits(w, key) != key.bits).sum())
    opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        embed_loss(w, key).backward()
        opt.step()
    assert start > 3 and int((extract_bits(w, key) != key.bits).sum()) == 0
    assert float(embed_loss(w.detach(), key)) < 0.1


def _mnist_cnn_spec(sd: dict[str, torch.Tensor]) -> Spec:
    """conv1's 16 neurons (conv2's input channels) and conv2's 32 neurons (each feeding a
    7x7 block of fc1's inputs), written by hand."""
    spec = Spec(
        (
            Group("conv1", 16, (Member("conv1.weight", 0), Member("conv1.bias", 0), Member("conv2.weight", 1))),
            Group("conv2", 32, (Member("conv2.weight", 0), Member("conv2.bias", 0), Member("fc1.weight", 1, block=49))),
        )
    )
    spec.validate(sd)
    return spec


def test_watermarked_mnist_cnn_keeps_accuracy_carries_the_key_and_breaks_under_input_permutation(
    watermarked_mnist_cnn, trained_mnist_cnn, mnist_data
) -> None:
    model, sd, key = watermarked_mnist_cnn
    plain_model, plain_sd = trained_mnist_cnn
    assert key.layer == "conv2.weight" and key.T == 64
    test = mnist_data[1]  # the held-out split train.trained() never sees
    acc, plain_acc = train.evaluate(model, test), train.evaluate(plain_model, test)
    assert acc > 0.95 and abs(acc - plain_acc) <= 0.01, (acc, plain_acc)

    found = detect(sd, key)
    assert found["bit_errors"] == 0 and found["detected"] and found["p_value"] < 1e-15
    assert found["log10_p_value"] == pytest.approx(-64 * math.log10(2))
    # The same architecture and seed without the regularizer does not carry the key.
    assert not detect(plain_sd, key)["detected"]

    spec = _mnist_cnn_spec(sd)
    g = torch.Generator().manual_seed(0)
    in_errors = []
    for _ in range(5):
        # Permuting conv1's neurons (the key layer's input channels) keeps the function ...
        moved = apply_permutations(sd, spec, {"conv1": torch.randperm(16, generator=g)})
        x = test.tensors[0][:64]
        with torch.no_grad():
            assert torch.allclose(functional_call(model, moved, x), functional_call(model, sd, x), atol=1e-4)
        # ... but scrambles the read-out: about half the bits wrong, no detection.
        r = detect(moved, key)
        assert not r["detected"]
        in_errors.append(r["bit_errors"])
        # Permuting conv2's own neurons leaves the mean over outputs, hence every bit, intact.
        own = apply_permutations(sd, spec, {"conv2": torch.randperm(32, generator=g)})
        assert torch.equal(extract_bits(own["conv2.weight"], key), extract_bits(sd["conv2.weight"], key))
        assert detect(own, key)["bit_errors"] == 0
    assert 16 <= sorted(in_errors)[2] <= 48, in_errors

