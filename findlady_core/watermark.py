"""White-box watermark of Uchida et al. 2017 (paper section "Application to white-box
watermarking").

A secret projection ``X`` (T x M) and ``T`` bits. The embedded vector of the key layer is the
mean of its weight over output neurons (``flatten = "mean_out"``): ``w = W.mean(0).flatten()``.
Embedding adds ``lambda * BCE(sigmoid(X w), bits)`` to the training loss; extraction reads
``bit_j = 1 if (X w)_j > 0``. The mean over outputs makes the key blind to a permutation of
the layer's own neurons, but a permutation of its input channels (the previous layer's
neurons) scrambles ``w``: the attack that re-synchronization counters.

The verdict uses the binomial tail ``P[Binomial(T, 1/2) <= errors]``, never a bare accuracy.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from findlady_core.errors import KeyFileError, WeightsError
from findlady_core.io import load_state_dict

SCHEME = "uchida"
FLATTEN = "mean_out"
MAX_BITS = 1 << 16  # far above any practical key (Uchida used 256 bits)
MAX_X_ELEMENTS = 1 << 26  # 256 MiB of float32
MAX_KEY_BYTES = 4 * MAX_X_ELEMENTS + MAX_BITS + (1 << 20)  # tensors plus a generous header


@dataclass(frozen=True)
class WatermarkKey:
    """The secret: projection ``X`` (float32, T x M), the ``bits`` (uint8 0/1, T) and the name
    of the watermarked weight tensor. Construction validates (KeyFileError on nonsense)."""

    X: Tensor
    bits: Tensor
    layer: str
    flatten: str = FLATTEN

    def __post_init__(self) -> None:
        _validate(self.X, self.bits, self.layer, self.flatten)

    @property
    def T(self) -> int:
        return int(self.bits.numel())

    @property
    def M(self) -> int:
        return int(self.X.shape[1])


def _validate(X: Any, bits: Any, layer: Any, flatten: Any) -> None:
    if flatten != FLATTEN:
        raise KeyFileError(f"unsupported key flatten {flatten!r}; only {FLATTEN!r} is known")
    if not isinstance(layer, str) or not layer or len(layer) > 1000:
        raise KeyFileError("key layer must be a non-empty tensor name")
    if not isinstance(X, Tensor) or not isinstance(bits, Tensor):
        raise KeyFileError("key X and bits must be tensors")
    if X.dtype != torch.float32 or X.dim() != 2:
        raise KeyFileError(f"key X must be a 2-D float32 tensor (T x M), got {X.dtype} {tuple(X.shape)}")
    if bits.dtype != torch.uint8 or bits.dim() != 1:
        raise KeyFileError(f"key bits must be a 1-D uint8 tensor, got {bits.dtype} {tuple(bits.shape)}")
    T, M = X.shape
    if T == 0 or M == 0:
        raise KeyFileError(f"key X is empty ({T} x {M})")
    if bits.numel() != T:
        raise KeyFileError(f"key has {bits.numel()} bits but X has {T} rows")
    if T > MAX_BITS:
        raise KeyFileError(f"key has {T} bits, more than the limit {MAX_BITS}")
    if X.numel() > MAX_X_ELEMENTS:
        raise KeyFileError(f"key X has {X.numel()} elements, more than the limit {MAX_X_ELEMENTS}")
    if bool((bits > 1).any()):
        raise KeyFileError("key bits must be 0 or 1")
    if not bool(torch.isfinite(X).all()):
        raise KeyFileError("key X holds NaN or Inf")


def _weight_shape(layer: str, shape_or_sd: Sequence[int] | Mapping[str, Tensor]) -> tuple[int, ...]:
    if isinstance(shape_or_sd, Mapping):
        if layer not in shape_or_sd:
            raise KeyFileError(f"key layer {layer!r} is not in the state dict")
        return tuple(shape_or_sd[layer].shape)
    return tuple(int(s) for s in shape_or_sd)


def embedded_dim(shape: Sequence[int]) -> int:
    """M for a weight shape: ``in`` for a linear, ``in*kh*kw`` for a conv."""
    if len(shape) not in (2, 4):
        raise KeyFileError(f"a watermark layer must be a 2-D (linear) or 4-D (conv) weight, got shape {tuple(shape)}")
    return int(math.prod(shape[1:]))


def generate_key(
    layer: str, weight_shape: Sequence[int] | Mapping[str, Tensor], *, bits: int = 64, seed: int
) -> WatermarkKey:
    """A fresh key for ``layer``: X ~ N(0, 1) of shape (bits, M) and uniform random bits.

    ``weight_shape`` is the layer's weight shape or a state dict holding it.
    """
    M = embedded_dim(_weight_shape(layer, weight_shape))
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(bits, M, generator=g, dtype=torch.float32)
    b = torch.randint(0, 2, (bits,), generator=g, dtype=torch.uint8)
    return WatermarkKey(X, b, layer)


def save_key(key: WatermarkKey, path: str | Path) -> None:
    """Write the key as safetensors (the format in this module's docstring), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(
        {"X": key.X.detach().contiguous().cpu(), "bits": key.bits.detach().contiguous().cpu()},
        str(tmp),
        metadata={"scheme": SCHEME, "layer": key.layer, "flatten": key.flatten},
    )
    os.replace(tmp, path)


def load_key(path: str | Path, *, max_bytes: int = MAX_KEY_BYTES) -> WatermarkKey:
    """Read and validate a key file; safe on untrusted input (safetensors only, bounded size).

    Anything off (not safetensors, wrong scheme or flatten, missing or extra tensors, wrong
    dtype or shape, bits not 0/1, too many bits, NaN) raises KeyFileError naming it.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise KeyFileError(f"cannot read key {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block
        raise KeyFileError(f"key {path} is not a regular file")
    size = st.st_size
    if size > max_bytes:
        raise KeyFileError(f"key file is {size} bytes, more than the limit {max_bytes}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            # Header facts, checked before any tensor body is read.
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in names & {"X", "bits"}}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise KeyFileError(f"key file is not a valid safetensors file: {e}") from None
    if "scheme" not in meta:
        raise KeyFileError("key file metadata lacks 'scheme' (expected 'uchida')")
    if meta["scheme"] != SCHEME:
        raise KeyFileError(f"unsupported watermark scheme {meta['scheme']!r}; only {SCHEME!r} is known")
    if "layer" not in meta:
        raise KeyFileError("key file metadata lacks 'layer'")
    if "flatten" not in meta:
        raise KeyFileError("key file metadata lacks 'flatten' (expected 'mean_out')")
    missing = {"X", "bits"} - names
    if missing:
        raise KeyFileError(f"key file lacks tensor(s) {', '.join(sorted(missing))}")
    extra = names - {"X", "bits"}
    if extra:
        raise KeyFileError(f"key file holds unexpected tensor(s) {', '.join(sorted(extra)[:5])}")
    if header["X"][0] != "F32" or len(header["X"][1]) != 2:
        raise KeyFileError(f"key X must be a 2-D float32 tensor, file has {header['X'][0]} {header['X'][1]}")
    if header["bits"][0] != "U8" or len(header["bits"][1]) != 1:
        raise KeyFileError(f"key bits must be a 1-D uint8 tensor, file has {header['bits'][0]} {header['bits'][1]}")
    if header["bits"][1][0] > MAX_BITS:
        raise KeyFileError(f"key has {header['bits'][1][0]} bits, more than the limit {MAX_BITS}")
    try:  # the shared safe loader: checks the header's offsets and refuses NaN/Inf
        tensors = load_state_dict(path, max_bytes=max_bytes)
    except WeightsError as e:
        raise KeyFileError(f"key file refused: {e}") from None
    return WatermarkKey(tensors["X"], tensors["bits"], meta["layer"], meta["flatten"])


def check_key(key: WatermarkKey, state_dict: Mapping[str, Tensor], spec: Any = None) -> None:
    """The key fits the model: its layer exists, is a floating linear (2-D) or conv (4-D)
    weight whose embedded size equals the key's M, and (with a spec) is a spec member."""
    if key.layer not in state_dict:
        raise KeyFileError(f"key is for layer {key.layer!r} which the model does not have")
    w = state_dict[key.layer]
    if not w.is_floating_point():
        raise KeyFileError(f"key layer {key.layer!r} is not floating point ({w.dtype})")
    M = embedded_dim(tuple(w.shape))
    if M != key.M:
        raise KeyFileError(f"key expects {key.M} values from layer {key.layer!r}, whose shape {tuple(w.shape)} gives {M}")
    if spec is not None and key.layer not in spec.tensors:
        raise KeyFileError(f"key is for layer {key.layer} which the spec does not cover")


def embedded_vector(weight: Tensor) -> Tensor:
    """``w``: the weight averaged over output neurons, flattened (conv: in*kh*kw; linear: in)."""
    embedded_dim(tuple(weight.shape))
    return weight.mean(0).flatten()


def projection(weight: Tensor, key: WatermarkKey) -> Tensor:
    """``X w`` (differentiable, on the weight's device and dtype)."""
    w = embedded_vector(weight)
    if w.numel() != key.M:
        raise KeyFileError(f"key expects {key.M} values, the weight of shape {tuple(weight.shape)} gives {w.numel()}")
    return key.X.to(device=w.device, dtype=w.dtype) @ w


def embed_loss(weight: Tensor, key: WatermarkKey) -> Tensor:
    """Uchida's regularizer: mean binary cross-entropy between sigmoid(X w) and the bits.
    Add ``strength * embed_loss`` to the task loss while training."""
    logits = projection(weight, key)
    return F.binary_cross_entropy_with_logits(logits, key.bits.to(device=logits.device, dtype=logits.dtype))


def regularizer(key: WatermarkKey, strength: float) -> Callable[[nn.Module], Tensor]:
    """A ``train(regularizer=...)`` callable: ``strength * embed_loss`` on the key's layer."""

    def reg(model: nn.Module) -> Tensor:
        params = dict(model.named_parameters())
        if key.layer not in params:
            raise KeyFileError(f"key is for layer {key.layer!r} which the model does not have")
        return strength * embed_loss(params[key.layer], key)

    return reg


def extract_bits(weight: Tensor, key: WatermarkKey) -> Tensor:
    """The bits read from ``weight`` (uint8 0/1): ``(X w)_j > 0``, computed on CPU in float64
    so the read-out does not depend on the device or the weight's dtype."""
    w = embedded_vector(weight.detach().to("cpu", torch.float64))
    if w.numel() != key.M:
        raise KeyFileError(f"key expects {key.M} values, the weight of shape {tuple(weight.shape)} gives {w.numel()}")
    return ((key.X.double() @ w) > 0).to(torch.uint8)


def binomial_tail(errors: int, bits: int) -> tuple[float, float]:
    """``(p, log10 p)`` with ``p = P[Binomial(bits, 1/2) <= errors]``; log10 stays exact when p
    underflows to 0 (summed in log space)."""
    from scipy.special import logsumexp
    from scipy.stats import binom

    p = float(binom.cdf(errors, bits, 0.5))
    log_p = float(logsumexp(binom.logpmf(np.arange(errors + 1), bits, 0.5)))
    return p, min(0.0, log_p / math.log(10))


def detect(state_dict: Mapping[str, Tensor], key: WatermarkKey, *, alpha: float = 1e-6) -> dict[str, Any]:
    """Read the watermark from ``state_dict`` and decide: detected when the chance of so few
    bit errors from an unrelated model, ``P[Binomial(T, 1/2) <= errors]``, is below ``alpha``."""
    check_key(key, state_dict)
    got = extract_bits(state_dict[key.layer], key)
    errors = int((got != key.bits).sum())
    p, log10_p = binomial_tail(errors, key.T)
    return {
        "scheme": SCHEME,
        "bits": key.T,
        "bit_errors": errors,
        "p_value": p,
        "log10_p_value": log10_p,
        "detected": p < alpha,
        "alpha": alpha,
    }
