"""Norm weights folded into the projections that read them, in both models, before comparing.

In a pre-norm transformer a norm's output ``g * n(x) + b`` (RMSNorm: no ``b``) feeds only the
projections after it: q/k/v, the MLP's input projections (gate + up, GPT-2's ``c_fc``), and for
the final norm the output head. Multiplying ``g_i`` and ``b_i`` by any ``c_i != 0`` and dividing
column ``i`` of every reader by ``c_i`` keeps the function, but changes the cosines of the
stream's neurons and of every neuron that reads the norm (``scale_norms``, the ``--scale-norms``
attack). Folding removes that freedom: readers ``W' = W diag(g)`` along the stream axis, the
weight set to ones and the bias to ``b / g`` (both invariant under the attack: ``(c b) / (c g)``);
``findlady_core.rotation.fold`` folds the same way. It is per channel, so it commutes with every
permutation of the stream and of the readers' other axis.

Only where that is an exact symmetry: the norms of the pre-norm families of
``findlady_core.rotation.family`` (``llama``, ``mistral``, ``qwen2`` RMSNorm; ``gpt2`` pre-LN),
recognised from tensor names (no config needed), each norm with the readers that family lists.
A final norm whose head is tied to the embedding table (stored once) is left alone: its reader
is also the input table. Post-LN models (BERT: the LayerNorm's output is also the residual) have
no such norms and are never folded. A LayerNorm with a weight near 0 in either model is left
alone too (its bias cannot be carried as ``b / g``).

The suspect written out is the folded, re-synchronized suspect *unfolded onto the reference's
norm weights* (``unfold``): it computes the suspect's function and is in the reference's
parameterization, so integrity and the watermark read it tensor by tensor as usual; a real
change to a norm weight shows up in the readers that absorbed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from findlady_core.errors import InputError
from findlady_core.rotation.family import Norm, check_family, family_from_config

StateDict = Mapping[str, torch.Tensor]
MIN_NORM_WEIGHT = 1e-8  # a LayerNorm weight this close to 0 cannot carry its bias as b / g
SAME = 1e-5
"""Relative difference below which a suspect's norm weight counts as the reference's (float32
rounding of a copy): only norms that differ are listed as ``norm_fold`` transforms."""


def _config_from_names(sd: StateDict) -> dict[str, Any] | None:
    """A minimal transformers config for a state dict whose names are those of a pre-norm family."""
    names = set(sd)
    for p in ("model.", ""):
        if f"{p}embed_tokens.weight" in names and f"{p}layers.0.input_layernorm.weight" in names:
            layers = sum(1 for i in range(len(names)) if f"{p}layers.{i}.input_layernorm.weight" in names)
            return {"model_type": "llama", "hidden_size": int(sd[f"{p}embed_tokens.weight"].shape[1]),
                    "num_hidden_layers": layers, "tie_word_embeddings": "lm_head.weight" not in names}
    for p in ("transformer.", ""):
        if f"{p}wte.weight" in names and f"{p}h.0.ln_1.weight" in names:
            layers = sum(1 for i in range(len(names)) if f"{p}h.{i}.ln_1.weight" in names)
            return {"model_type": "gpt2", "n_embd": int(sd[f"{p}wte.weight"].shape[1]), "n_layer": layers,
                    "tie_word_embeddings": "lm_head.weight" not in names}
    return None


def foldable_norms(*state_dicts: StateDict) -> tuple[Norm, ...]:
    """The norms that fold exactly in every one of ``state_dicts`` (module docstring); () when the
    names are not those of a pre-norm family, or the family does not check out."""
    config = _config_from_names(state_dicts[0])
    if config is None:
        return ()
    try:
        family = family_from_config(config, state_dicts[0].keys())
        for sd in state_dicts:
            check_family(family, sd)
    except InputError:
        return ()
    out = []
    for norm in family.norms:
        tensors = [r.weight for r in norm.readers] + [norm.weight] + ([norm.bias] if norm.bias else [])
        if not norm.readers or not all(t in sd for sd in state_dicts for t in tensors):
            continue  # a tied head: its reader is the input table as well
        if norm.bias and any(bool((sd[norm.weight].abs() < MIN_NORM_WEIGHT).any()) for sd in state_dicts):
            continue
        out.append(norm)
    return tuple(out)


def _along(v: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[axis] = -1
    return v.view(shape)


def _work(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fold(sd: StateDict, norms: tuple[Norm, ...]) -> dict[str, torch.Tensor]:
    """Every norm's weight folded into its readers (kept in float32, float64 for float64
    models), its bias divided by it, its weight set to ones. Function-preserving."""
    out = dict(sd)
    for norm in norms:
        g = sd[norm.weight].double()
        for r in norm.readers:
            W = sd[r.weight]
            out[r.weight] = (W.double() * _along(g, W, r.axis)).to(_work(W))
        if norm.bias:
            b = sd[norm.bias]
            out[norm.bias] = (b.double() / g).to(_work(b))
        out[norm.weight] = torch.ones_like(sd[norm.weight], dtype=_work(sd[norm.weight]))
    return out


def unfold(folded: StateDict, norms: tuple[Norm, ...], like: StateDict, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Undo ``fold`` with ``like``'s norm weights (the reference's), each tensor cast back to
    ``dtypes`` (the suspect's): ``unfold(fold(sd), like=sd) == sd`` up to rounding."""
    out = dict(folded)
    for norm in norms:
        g = like[norm.weight].double()
        for r in norm.readers:
            W = folded[r.weight]
            out[r.weight] = (W.double() / _along(g, W, r.axis)).to(dtypes[r.weight])
        if norm.bias:
            out[norm.bias] = (folded[norm.bias].double() * g).to(dtypes[norm.bias])
        out[norm.weight] = like[norm.weight].to(dtypes[norm.weight]).clone()
    return out


def _tol(reference: StateDict, norm: Norm) -> float:
    return SAME * float(reference[norm.weight].double().abs().max().clamp_min(1e-300))


def same_values(reference: StateDict, suspect: StateDict, norm: Norm) -> bool:
    """The suspect's weights are the reference's up to a permutation of channels: sorted values
    agree within ``SAME``. Cheap, before any re-synchronization. (Only the weight: where it is
    the reference's, folding scales the bias alike in both models and absorbs nothing.)"""
    r, s = (sd[norm.weight].double().sort().values for sd in (reference, suspect))
    return bool(((r - s).abs() <= _tol(reference, norm)).all())


def _channels(reference: StateDict, aligned: Mapping[str, torch.Tensor], norm: Norm) -> torch.Tensor:
    """Per channel: the suspect's weight, in reference order, is not the reference's."""
    return (aligned[norm.weight].double() - reference[norm.weight].double()).abs() > _tol(reference, norm)


def differs(reference: StateDict, aligned: Mapping[str, torch.Tensor], norm: Norm) -> bool:
    return bool(_channels(reference, aligned, norm).any())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fold_transforms(reference: StateDict, folded_ref: StateDict, resynced_folded: StateDict, aligned: Mapping[str, torch.Tensor],
                    norms: tuple[Norm, ...], group_of: Mapping[str, str]) -> list[dict[str, Any]]:  # fmt: skip
    """One ``norm_fold`` entry per norm whose suspect weight, in reference order
    (``aligned``: norm tensor -> the suspect's values at the reference's positions), is not the
    reference's: the fold absorbed the difference. ``residual``: the relative difference of the
    folded readers (0 for a rescaled copy; a real change to the norm shows there)."""
    out = []
    for norm in norms:
        g_r, g_s = reference[norm.weight].double(), aligned[norm.weight].double()
        c = g_s / torch.where(g_r == 0, torch.ones_like(g_r), g_r)
        per = _channels(reference, aligned, norm)
        if not bool(per.any()):
            continue
        idx = torch.nonzero(per).flatten()
        res = max(_rel(resynced_folded[r.weight].double(), folded_ref[r.weight].double()) for r in norm.readers)
        out.append({
            "kind": "norm_fold", "group": group_of.get(norm.weight, ""), "norm": norm.weight, "bias": norm.bias,
            "readers": [r.weight for r in norm.readers], "neurons": int(idx.numel()),
            "factor_min": float(c[idx].min()), "factor_max": float(c[idx].max()),
            "negative": int((c[idx] < 0).sum()), "residual": res, "function_preserving": True,
            "checked": "folded into the readers' input columns in both models; residual: the folded readers' relative difference",
        })
    return out


def scale_norms(sd: StateDict, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The attack: every foldable norm's channel ``i`` (weight and bias) times its own ``c_i``
    (``|c|`` log-uniform in [0.25, 4], sign at random), column ``i`` of every reader times
    ``1 / c_i``. Function-preserving (module docstring)."""
    norms = foldable_norms(sd)
    if not norms:
        raise InputError("--scale-norms: no norm to rescale (the tensor names are not those of a pre-norm llama, "
                         "mistral, qwen2 or gpt2 model; post-LayerNorm models such as BERT have none)")
    gen = torch.Generator().manual_seed(seed + 7006)
    out = dict(sd)
    for norm in norms:
        d = sd[norm.weight].shape[0]
        c = torch.exp((torch.rand(d, generator=gen, dtype=torch.float64) * 2 - 1) * torch.log(torch.tensor(4.0)))
        c = c * torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
        for name in (norm.weight, norm.bias):
            if name:
                out[name] = (sd[name].double() * c).to(sd[name].dtype)
        for r in norm.readers:
            W = sd[r.weight]
            out[r.weight] = (W.double() / _along(c, W, r.axis)).to(W.dtype)
    return out
