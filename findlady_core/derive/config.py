"""A ``config.json`` as untrusted data: validated, then built as an installed transformers class.

Only classes that ship with the installed transformers are built, never code from an upload
(``trust_remote_code`` is never set; an ``auto_map`` is dropped). Sizes are bounded before
anything is built. Models are built on the meta device: no memory for weights, no init cost.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from findlady_core.errors import SpecError

MAX_INT = 1 << 31
MAX_LAYERS = 256
MAX_PARAMETERS = 2 * 10**12
MAX_KEYS = 2000
SEQ = 6  # tokens in the traced example input

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
              "num_decoder_layers")
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads")
FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "hidden_dim",
            "ffn_hidden_size",
            "moe_intermediate_size", "shared_expert_intermediate_size")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id")


def _check_values(v: Any, where: str, depth: int = 0) -> None:
    if depth > 8:
        raise SpecError(f"config: {where} is nested too deeply")
    if isinstance(v, bool) or v is None or isinstance(v, str):
        if isinstance(v, str) and len(v) > 10_000:
            raise SpecError(f"config: {where} is a string of {len(v)} characters")
        return
    if isinstance(v, int):
        if not -MAX_INT <= v <= MAX_INT:
            raise SpecError(f"config: {where} = {v} is out of range")
    elif isinstance(v, float):
        if v != v or abs(v) > 1e30:
            raise SpecError(f"config: {where} = {v} is not a usable number")
    elif isinstance(v, (list, tuple)):
        if len(v) > 4096:
            raise SpecError(f"config: {where} is a list of {len(v)} items")
        for i, x in enumerate(v):
            _check_values(x, f"{where}[{i}]", depth + 1)
    elif isinstance(v, Mapping):
        if len(v) > MAX_KEYS:
            raise SpecError(f"config: {where} has {len(v)} keys")
        for k, x in v.items():
            if not isinstance(k, str):
                raise SpecError(f"config: {where} has a key that is not a string")
            _check_values(x, f"{where}.{k}", depth + 1)
    else:
        raise SpecError(f"config: {where} has a value of type {type(v).__name__}")


def validate_config(config: Any) -> tuple[dict[str, Any], list[str]]:
    """A checked copy of ``config`` and notes about what was dropped; SpecError names the problem."""
    if not isinstance(config, Mapping):
        raise SpecError("config must be a JSON object")
    _check_values(config, "config")
    cfg = dict(config)
    notes = []
    from transformers import CONFIG_MAPPING

    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
        raise SpecError(f"config: model_type {mt!r} is not a family the installed transformers knows")
    if "auto_map" in cfg:
        cfg.pop("auto_map")
        notes.append("config auto_map ignored: only the installed transformers class is built, never uploaded code")
    if cfg.get("quantization_config"):
        raise SpecError("config: quantized checkpoints are not supported (their tensors are not the model's weights)")
    for k in LAYER_KEYS:
        v = cfg.get(k)
        if isinstance(v, int) and not 0 <= v <= MAX_LAYERS:
            raise SpecError(f"config: {k} = {v} is outside [0, {MAX_LAYERS}]")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise SpecError("config: architectures must be a list of class names")
    return cfg, notes


def model_class(cfg: Mapping[str, Any]) -> type[nn.Module]:
    """The installed class ``architectures`` names (checked against ``model_type``), else the
    family's base model."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoModel, PreTrainedModel

    config_cls = CONFIG_MAPPING[cfg["model_type"]]
    archs = cfg.get("architectures") or []
    if archs:
        name = archs[0]
        cls = getattr(transformers, name, None) if name.isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise SpecError(f"config: architecture {name!r} is not a model class of the installed transformers")
        if not issubclass(config_cls, cls.config_class):
            raise SpecError(f"config: architecture {name!r} belongs to {cls.config_class.model_type!r}, not {cfg['model_type']!r}")
        return cls
    try:
        return AutoModel._model_mapping[config_cls]  # type: ignore[attr-defined,no-any-return]
    except KeyError:
        raise SpecError(f"config: no base model class for model_type {cfg['model_type']!r}") from None


def build(cfg: Mapping[str, Any], device: str = "meta") -> tuple[nn.Module, Any]:
    """The model (eval mode, eager attention) and its config object; weights on ``device``."""
    from transformers import CONFIG_MAPPING

    cls = model_class(cfg)
    d = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")}
    try:
        conf = CONFIG_MAPPING[cfg["model_type"]].from_dict(d)
        conf._attn_implementation = "eager"
        with torch.device(device):
            model = cls(conf)
    except SpecError:
        raise
    except Exception as e:  # a config the class rejects: say so instead of a traceback
        raise SpecError(f"config: {cls.__name__} cannot be built from it: {type(e).__name__}: {str(e)[:300]}") from None
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMETERS:
        raise SpecError(f"config describes {n} parameters, more than {MAX_PARAMETERS}")
    return model.eval(), conf


def example_inputs(model: nn.Module, conf: Any, device: str = "meta", seed: int = 0) -> dict[str, Any]:
    """Keyword inputs for ``model.forward``: token ids or pixels, the cache off."""
    params = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = {}
    if "input_ids" in params:
        vocab = int(getattr(conf, "vocab_size", 2) or 2)
        ids = torch.randint(0, vocab, (1, SEQ), generator=g)
        kw["input_ids"] = ids.to(device)
        if "decoder_input_ids" in params:
            kw["decoder_input_ids"] = ids.to(device)
    elif "pixel_values" in params:
        size = getattr(conf, "image_size", None) or 64
        size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        ch = int(getattr(conf, "num_channels", 3) or 3)
        kw["pixel_values"] = torch.randn((1, ch, *size), generator=g).to(device)
    else:
        raise SpecError(f"{type(model).__name__} takes neither input_ids nor pixel_values: no example input to trace with")
    if "use_cache" in params:
        kw["use_cache"] = False
    return kw


def shrink(cfg: Mapping[str, Any], layers: bool = True) -> dict[str, Any]:
    """A copy with few layers and small widths but the same head structure (heads, kv heads,
    rotary fraction, stages), for the self-check to run in float64 in a moment. With
    ``layers=False`` the layer counts stay (some families derive lists from them)."""
    c = dict(cfg)
    for k in LAYER_KEYS if layers else ():
        if isinstance(c.get(k), int):
            n, c[k] = c[k], min(c[k], 2)
            for key, v in c.items():  # per-layer lists (layer_types): the first layers' entries
                if isinstance(v, list) and len(v) == n and n > c[k] and key not in ("hidden_sizes", "depths"):
                    c[key] = v[: c[k]]
    heads = next((c[k] for k in HEAD_KEYS if isinstance(c.get(k), int) and c[k] > 0), None)
    hidden_key = next((k for k in ("hidden_size", "n_embd", "d_model", "dim") if isinstance(c.get(k), int)), None)
    if heads and hidden_key:
        hd = 8
        old_hd = c.get("head_dim") if isinstance(c.get("head_dim"), int) else c[hidden_key] // heads
        frac = c.get("partial_rotary_factor")
        if isinstance(c.get("rotary_dim"), int) and old_hd:
            frac = c["rotary_dim"] / old_hd
        if isinstance(frac, (int, float)) and 0 < frac < 1:
            while (hd * frac) % 2:
                hd *= 2
        if isinstance(c.get("rotary_dim"), int) and isinstance(frac, (int, float)):
            c["rotary_dim"] = int(hd * frac)
        if isinstance(c.get("head_dim"), int) or c[hidden_key] != heads * old_hd:
            c["head_dim"] = hd
        if isinstance(c.get("d_kv"), int):
            c["d_kv"] = hd
        c[hidden_key] = heads * hd
        small = heads * hd
    elif hidden_key:
        small = c[hidden_key] = min(c[hidden_key], 24)
    else:
        small = 16
    for k in FFN_KEYS:
        if isinstance(c.get(k), int):
            c[k] = min(c[k], small + 12)
    for k in POSITION_KEYS:
        if isinstance(c.get(k), int):
            c[k] = min(c[k], 64)
    if isinstance(c.get("vocab_size"), int):
        ids = [v for k in ID_KEYS for v in (c.get(k) if isinstance(c.get(k), list) else [c.get(k)]) if isinstance(v, int)]
        c["vocab_size"] = min(c["vocab_size"], max([64] + [i + 1 for i in ids]))
    if isinstance(c.get("image_size"), int):
        p = c.get("patch_size")
        staged = isinstance(c.get("hidden_sizes"), list)  # a CNN downsamples at every stage
        c["image_size"] = min(c["image_size"], 2 * p if isinstance(p, int) and not staged else 64)
    if isinstance(c.get("hidden_sizes"), list):
        c["hidden_sizes"] = [8 * (i + 1) for i in range(len(c["hidden_sizes"]))]
    if isinstance(c.get("embedding_size"), int) and "hidden_sizes" in c:
        c["embedding_size"] = 8
    if isinstance(c.get("depths"), list):
        c["depths"] = [min(int(d), 2) for d in c["depths"]]
    return c
