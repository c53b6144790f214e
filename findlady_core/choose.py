"""Which spec a model gets when no spec is given: honest about what the weights can tell.

``spec_for(state_dict, config, num_heads=..., allow_guess=...)`` is the one entry point the CLI
(``spec infer --weights``) and the service (a reference registered without a spec) use:

* with a ``config.json``: the spec derived from its architecture (``findlady_core.derive``: any
  family the installed transformers ships, exact or pinned where not understood, self-checked);
* without one: the catalog family the tensor names match, heads only when ``num_heads`` is
  given (a head count guessed from the width breaks the function silently), and only when the
  family's spec covers every tensor that may read the hidden stream (RoBERTa's classifier is
  not BERT's); else a chain guess, only for a plain chain (each layer's inputs are the previous
  layer's outputs, and no tensor name says attention, embedding or shortcut), and only with
  ``allow_guess``. Anything else is refused with ``UnknownFamilyError``, which lists the known
  families and says what to give.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from findlady_core import families
from findlady_core.errors import SpecError
from findlady_core.spec import Spec

# Dotted-name components that mean the layers do not form a plain chain (branches, attention,
# lookups, skips): a chain guessed through them would break the function.
_BRANCH_WORDS = re.compile(
    r"(.*attn.*|.*attention.*|query|key|value|[qkvo]_proj|qkv|c_attn|c_proj|gate_proj|up_proj|down_proj"
    r"|shortcut|downsample|residual|skip|.*embed.*|wte|wpe|cls_token|position_ids|rotary_emb|lm_head)"
)


class UnknownFamilyError(SpecError):
    """No honest spec can be made from what was given."""

    code = "unknown_family"


class GuessRefusedError(SpecError):
    """The only spec at hand is a guess, and the caller did not allow one."""

    code = "guess_refused"


def known_families() -> list[str]:
    """Registered architecture families (the plain chain is a guess, not a family)."""
    return [n for n in families.names() if n != "chain"]


def unknown(why: str) -> UnknownFamilyError:
    return UnknownFamilyError(
        f"{why}: this family is not known (known families: {', '.join(known_families())}). Give config.json "
        "(or the model's folder, which holds it), or a spec (findlady spec infer --module, or a "
        "findlady.spec/1 file)"
    )


def spec_for(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None, *,
    num_heads: int | None = None, allow_guess: bool = True, family: str | None = None,
) -> Spec:
    """The spec of a model from its weights and, when at hand, its config (module docstring).

    ``family`` forces a registered family by name (``"chain"``: the plain-chain guess). The
    spec's ``meta["source"]`` says where it came from: ``config``, ``catalog``, ``chain`` (a guess, with a
    ``UserWarning``). Raises ``UnknownFamilyError``, ``GuessRefusedError`` or ``SpecError``.
    """
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise SpecError(f"num_heads must be a positive integer, got {num_heads!r}")
    if config is not None and family is None:
        return _from_config(state_dict, config, num_heads)
    name = family or families.detect(state_dict)
    if name == "chain" or name is None:
        return _chain(state_dict, allow_guess, forced=name == "chain")
    if name == "bert":
        return _bert(state_dict, num_heads)
    return _mark(families.build(name, state_dict), "catalog")


def _from_config(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], num_heads: int | None) -> Spec:
    """The spec derived from the architecture ``config.json`` names (``findlady_core.derive``):
    the installed transformers class traced on the meta device, self-checked on a shrunk copy."""
    from findlady_core.derive import spec_from_config

    n = config.get("num_attention_heads")
    if num_heads is not None and isinstance(n, int) and num_heads != n:
        raise SpecError(f"num_heads={num_heads} contradicts config.json's num_attention_heads={n}")
    stored = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}
    return _mark(spec_from_config(config, stored), "config")


def _bert(state_dict: Mapping[str, torch.Tensor], num_heads: int | None) -> Spec:
    from findlady_core.catalog import bert_spec, uncovered

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the uncovered tensors are refused below instead
        spec = bert_spec(state_dict, num_heads=num_heads, heads=num_heads is not None)
    odd = uncovered(state_dict, spec)
    if odd:
        raise unknown(
            f"the tensor names look like BERT but {len(odd)} tensor(s) are not BERT's and may read its hidden "
            f"states (e.g. {', '.join(repr(k) for k in odd[:3])})"
        )
    return _mark(spec, "catalog")


def plain_chain_problem(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Why the names say the weights are not a plain chain, or None."""
    for k in state_dict:
        for part in k.split("."):
            if _BRANCH_WORDS.fullmatch(part.lower()):
                return f"tensor {k[:100]!r} names a branch or lookup ({part!r}), not a plain chain of layers"
    return None


def _chain(state_dict: Mapping[str, torch.Tensor], allow_guess: bool, forced: bool) -> Spec:
    from findlady_core.infer import infer_chain_spec

    problem = plain_chain_problem(state_dict)
    if problem and not forced:
        raise unknown(problem)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec = infer_chain_spec(state_dict)
    except SpecError as e:
        if forced:
            raise
        raise unknown(f"no catalog family matches the tensor names, and they do not form a plain chain ({e})") from None
    if not allow_guess:
        raise GuessRefusedError(
            "the only spec at hand is a guess (a plain chain of layers, from tensor names and shapes): "
            "give a spec, or allow the guess (allow_guess=true)"
        )
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    return _mark(spec, "chain")


def _mark(spec: Spec, source: str) -> Spec:
    meta = dict(spec.meta or {})
    meta["source"] = source
    return dataclasses.replace(spec, meta=meta, source=source)


__all__ = ["spec_for", "known_families", "plain_chain_problem", "UnknownFamilyError", "GuessRefusedError"]
