"""Training, evaluation and fine-tuning of the bundled example models.

Deterministic for a seed: the seed fixes the initialisation (``trained``) and the order of
batches (a private generator), never global state beyond ``torch.manual_seed``. The optimiser
is the paper's: SGD, momentum 0.9, weight decay 1e-4. ``trained()`` caches weights as
safetensors under ``cache_dir()`` so tests and benchmarks train each model once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from findlady_examples import data as data_mod
from findlady_examples import models
from findlady_examples.names import WATERMARK_STRENGTH
from findlady_core.errors import InputError

if TYPE_CHECKING:
    from findlady_core.watermark import WatermarkKey

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4  # the paper's companion setup
CACHE_VERSION = 1  # bump when training code changes in a way the config hash cannot see

Regularizer = Callable[[nn.Module], Tensor]


def cache_dir() -> Path:
    """``$FINDLADY_CACHE_DIR``, else ``~/.cache/findlady``; created on demand. Outside the
    checkout, so an installed package never writes next to its own code."""
    env = os.environ.get("FINDLADY_CACHE_DIR")
    d = Path(env).expanduser() if env else Path.home() / ".cache" / "findlady"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _batches(ds: Dataset, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled mini-batches; TensorDatasets are sliced directly (no DataLoader overhead)."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors[0], ds.tensors[1]
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            yield x[idx], y[idx]
    else:
        yield from DataLoader(ds, batch_size=batch_size, shuffle=True, generator=generator)


def train(
    model: nn.Module,
    train_ds: Dataset,
    *,
    epochs: float,
    lr: float,
    seed: int,
    batch_size: int = 64,
    regularizer: Regularizer | None = None,
    progress: bool = False,
    schedule: str = "cosine",
) -> nn.Module:
    """Train ``model`` in place with cross-entropy (+ ``regularizer(model)`` per batch) and
    return it in eval mode. A fractional ``epochs`` runs that fraction of the last epoch's
    batches (at least one), which is how ``finetune`` honours small Theta.

    ``schedule="cosine"`` anneals the learning rate to 0 over the run: the weights settle, so
    the final accuracy (and BatchNorm's running statistics) do not depend on the last few
    noisy steps; ``"constant"`` keeps ``lr`` (used when resuming, as fine-tuning does)."""
    if schedule not in ("cosine", "constant"):
        raise InputError(f"unknown learning-rate schedule {schedule!r}; use cosine or constant")
    if epochs < 0 or not math.isfinite(epochs):
        raise InputError(f"epochs must be a finite number >= 0, got {epochs}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    n_batches = math.ceil(len(train_ds) / batch_size)  # type: ignore[arg-type]
    total = int(math.floor(epochs)) * n_batches + (math.ceil((epochs % 1) * n_batches) if epochs % 1 else 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="train", unit="batch", leave=False)
    model.train()
    step = 0
    while step < total:
        for x, y in _batches(train_ds, batch_size, gen):
            if step >= total:
                break
            loss = F.cross_entropy(model(x), y)
            if regularizer is not None:
                loss = loss + regularizer(model)
            if schedule == "cosine":
                for grp in opt.param_groups:
                    grp["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / total))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, ds: Dataset, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """(predicted labels, true labels) over ``ds`` in eval mode."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    dev = next(model.parameters()).device
    for x, y in DataLoader(ds, batch_size=batch_size):
        preds.append(model(x.to(dev)).argmax(1).cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(preds), torch.cat(labels)


def evaluate(model: nn.Module, test_ds: Dataset) -> float:
    """Top-1 accuracy in [0, 1]."""
    p, y = predict(model, test_ds)
    return float((p == y).float().mean())


def error_rate(model: nn.Module, test_ds: Dataset) -> float:
    """Top-1 error in percent (the paper's ``err %``)."""
    return 100.0 * (1.0 - evaluate(model, test_ds))


def finetune(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    train_ds: Dataset,
    *,
    fraction: float,
    original_epochs: int,
    seed: int,
    lr: float,
    batch_size: int = 64,
    regularizer: Regularizer | None = None,
) -> dict[str, Tensor]:
    """The paper's fine-tuning attack (Theta = ``fraction``): resume training from
    ``state_dict`` for ``fraction * original_epochs`` epochs. ``model`` only gives the
    architecture and is left untouched; returns the new state dict."""
    if not 0 <= fraction <= 100:
        raise InputError(f"fine-tuning fraction must be in [0, 100], got {fraction}")
    m = copy.deepcopy(model)
    m.load_state_dict(state_dict)
    train(m, train_ds, epochs=fraction * original_epochs, lr=lr, seed=seed, batch_size=batch_size,
          regularizer=regularizer, schedule="constant")
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@dataclass(frozen=True)
class TrainConfig:
    """Default recipe of an example model (part of the cache key)."""

    epochs: int
    lr: float
    batch_size: int = 64
    data_seed: int = 0  # one fixed split for every model seed: comparable test sets


CONFIGS: dict[str, TrainConfig] = {
    "mlp": TrainConfig(epochs=30, lr=0.1),
    "vgg": TrainConfig(epochs=6, lr=0.03, batch_size=32),  # no BatchNorm: a higher lr diverges
    "resnet": TrainConfig(epochs=5, lr=0.05, batch_size=32),
    "mnist_cnn": TrainConfig(epochs=8, lr=0.05),
}
KEY_SEED = 1234
TRAIN_THREADS = 1


def config(name: str) -> TrainConfig:
    models.info(name)
    return CONFIGS[name]


def _cache_key(name: str, seed: int, cfg: TrainConfig, model: nn.Module, key: WatermarkKey | None, strength: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "name": name, "seed": seed, "cfg": asdict(cfg),
                         "arch": repr(model), "wd": WEIGHT_DECAY, "mom": MOMENTUM, "threads": TRAIN_THREADS}, sort_keys=True).encode())
    if key is not None:
        h.update(json.dumps({"layer": key.layer, "flatten": key.flatten, "strength": strength}).encode())
        h.update(key.X.cpu().numpy().tobytes())
        h.update(key.bits.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def trained(
    name: str, seed: int = 0, *, watermark_key: WatermarkKey | None = None, watermark_strength: float = WATERMARK_STRENGTH,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Tensor]]:
    """The named example model trained on its data set with its default recipe, in eval mode,
    and a copy of its state dict. With ``watermark_key`` (a WatermarkKey) Uchida's regularizer
    embeds it. Cached in ``cache_dir()`` keyed by name, seed and a hash of the recipe.
    Training runs on one thread so the cached weights do not depend on the caller's setting."""
    from safetensors.torch import load_file, save_file

    cfg = config(name)
    torch.manual_seed(seed)
    model = models.build(name)
    tag = "wm-" if watermark_key is not None else ""
    path = cache_dir() / f"{name}-{tag}s{seed}-{_cache_key(name, seed, cfg, model, watermark_key, watermark_strength)}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        reg = None
        if watermark_key is not None:
            from findlady_core.watermark import regularizer

            reg = regularizer(watermark_key, watermark_strength)
        train_ds, _ = data_mod.load(models.info(name).dataset, cfg.data_seed)
        # One thread while training: the thread count changes float reduction order, so the
        # cached weights would otherwise depend on which caller (test, benchmark) came first.
        # These models are too small to gain from more threads on a shared 2-core machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(TRAIN_THREADS)
        try:
            train(model, train_ds, epochs=cfg.epochs, lr=cfg.lr, seed=seed, batch_size=cfg.batch_size,
                  regularizer=reg, progress=progress)
        finally:
            torch.set_num_threads(threads)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)  # atomic: concurrent test processes never see half a file
    model.eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def held_out(name: str) -> TensorDataset:
    """The held-out split the named example model is evaluated on."""
    return data_mod.load(models.info(name).dataset, config(name).data_seed)[1]


def watermarked(
    name: str = "mnist_cnn", seed: int = 0, *, bits: int = 64, key_seed: int = KEY_SEED, layer: str | None = None,
) -> tuple[nn.Module, dict[str, Tensor], WatermarkKey]:
    """``(model, state_dict, key)``: the example model trained with a fresh Uchida key of
    ``bits`` bits embedded in ``layer`` (default: the model's ``watermark_layer``)."""
    from findlady_core.watermark import generate_key

    torch.manual_seed(seed)
    shapes = {k: v.shape for k, v in models.build(name).state_dict().items()}
    layer = layer or getattr(models.info(name).factory, "watermark_layer", None)
    if layer is None:
        raise InputError(f"example model {name!r} has no default watermark layer; pass layer=")
    if layer not in shapes:
        raise InputError(f"example model {name!r} has no tensor {layer!r}")
    key = generate_key(layer, shapes[layer], bits=bits, seed=key_seed)
    model, sd = trained(name, seed, watermark_key=key)
    return model, sd, key
