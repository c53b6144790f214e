"""Module parameter names -> the names ``save_pretrained`` stores them under.

A tied tensor (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) has several module
names but is stored once; a spec must name what is in the files. When the stored names are
known (a folder's safetensors headers) they decide; otherwise transformers' own rule for
dropping tied duplicates predicts them. A non-persistent buffer (rotary ``inv_freq``) is never
stored: it is recomputed at load, so a permutation of it cannot be shipped and its axes stay
pinned.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn


def _predicted(model: nn.Module, state: dict[str, object]) -> set[str]:
    """The keys ``save_pretrained`` writes: tied duplicates and ignored keys dropped."""
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        kept = set(remove_tied_weights_from_state_dict(dict(state), model))  # type: ignore[arg-type]
    except (ImportError, AttributeError, TypeError):
        kept, seen = set(), set()
        for k, v in state.items():  # first name of each tensor, as older versions kept
            if id(v) not in seen:
                seen.add(id(v))
                kept.add(k)
    ignore = getattr(model, "_keys_to_ignore_on_save", None) or []
    return {k for k in kept if k not in ignore}


def _saved_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Module name -> the name ``save_pretrained`` writes. transformers 5 renames some families'
    modules and renames them back on save (ViT's ``layers.0.attention.q_proj`` is stored as
    ``encoder.layer.0.attention.attention.query``). A tensor a converter merges or splits on
    save (fused experts) has no stored name of its own: it is left out, so its axes stay pinned."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, apply_converters, apply_renamings

        conv = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    except Exception:  # an older transformers without conversions, or a model without any
        return {n: n for n in names}
    if not conv:
        return {n: n for n in names}
    back = [c.reverse_transform() for c in conv[::-1]]
    renamings = [c for c in back if isinstance(c, WeightRenaming)]
    converters = [c for c in back if isinstance(c, WeightConverter)]
    out = {}
    for n in names:
        if apply_converters(n, converters)[1] is None:
            out[n] = apply_renamings(n, renamings)
    return out


def _best_mapping(names: list[str], saved: dict[str, str], stored: set[str], prefix: str) -> dict[str, str]:
    """Module name -> stored name: as saved or as the module names it, with or without the base
    model's ``prefix.`` (a task model's base saved alone, or the reverse), whichever matches
    more of the stored names."""
    options = [saved, {n: n for n in names}]
    if prefix:
        p = prefix + "."
        for base in list(options):
            options.append({k: p + v for k, v in base.items()})
            options.append({k: v[len(p):] for k, v in base.items() if v.startswith(p)})
    best = max(options, key=lambda m: sum(v in stored for v in m.values()))
    return {k: v for k, v in best.items() if v in stored}


def stored_names(model: nn.Module, stored: Collection[str] | None = None) -> dict[str, list[str]]:
    """For every state-dict name of ``model`` (each alias of a tied tensor), the stored names of
    its tensor (all of them when a file keeps several aliases), or [] when it is not stored."""
    state = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for k, v in state.items():
        aliases.setdefault(id(v), []).append(k)
    saved = _saved_names(model, list(state))
    if stored is None:
        rename = {k: saved[k] for k in _predicted(model, state) if k in saved}
    else:
        rename = _best_mapping(list(state), saved, set(stored), getattr(model, "base_model_prefix", "") or "")
    out: dict[str, list[str]] = {}
    for names in aliases.values():
        keep = sorted({rename[n] for n in names if n in rename})
        for n in names:
            out[n] = keep
    return out
