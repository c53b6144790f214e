"""Which tensors of a transformer touch its residual stream, read from a transformers config.

A residual-stream rotation ``x -> Q x`` changes every tensor with a *stream axis* the same way:
that axis is multiplied by ``Q`` (embedding tables and every projection that reads the stream:
``W Q^T``; every projection that writes it and its bias: ``Q W``; both are "apply Q along the
stream axis"). Norm weights sit on the stream too, but a diagonal does not commute with ``Q``:
they are folded into the projections that read the norm's output first (``fold.py``).

``StreamFamily`` lists those tensors by name as plain data; ``family_from_config`` builds it for
the families whose symmetry is understood exactly:

- RMSNorm (``llama``, ``mistral``, ``qwen2``): ``RMS(Q x) = Q RMS(x)`` for any orthogonal Q.
- pre-LayerNorm (``gpt2``): ``LN(Q x) = Q LN(x)`` only when ``Q`` fixes the all-ones vector
  (the mean is taken along it).

Post-LN models (BERT and its kin) normalize the stream itself with per-dimension weights after
every residual addition, so nothing folds them away: they have no symmetry beyond permutations,
and asking for one is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from findlady_core.errors import InputError

RMS_FAMILIES = ("llama", "mistral", "qwen2")
LAYERNORM_FAMILIES = ("gpt2",)
POST_LN_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "camembert", "deberta")
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Reader:
    """A projection reading a norm's output: its weight and the weight's stream axis."""

    weight: str
    axis: int


@dataclass(frozen=True)
class Norm:
    """A norm on the stream and the projections reading its output."""

    weight: str
    bias: str | None
    readers: tuple[Reader, ...]


@dataclass(frozen=True)
class StreamFamily:
    """The stream-side tensors of one model, by name.

    ``stream``: every tensor with a stream axis except the norms' own weights, ``(name, axis)``.
    ``tables``: the token and position tables whose rows are fixed by the inputs (``(name,
    axis)``, a subset of ``stream``): the evidence that pins the stream. ``head``: the output
    projection (rows are tokens, a table too once untied); ``tied_to``: the table it shares
    its weight with, when the config ties them (folding unties them).
    """

    name: str
    norm: Literal["rms", "layer"]
    hidden: int
    norms: tuple[Norm, ...]
    stream: tuple[tuple[str, int], ...]
    tables: tuple[tuple[str, int], ...]
    head: str | None = None
    tied_to: str | None = None

    @property
    def fixes_ones(self) -> bool:
        """LayerNorm centres along the all-ones vector: its rotations must keep it."""
        return self.norm == "layer"

    def axis(self, name: str) -> int:
        return dict(self.stream)[name]


def load_config(path: str | Path) -> dict[str, Any]:
    """A transformers ``config.json`` (or a folder holding one) as a dict; bounded, JSON only."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        size = p.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read config {p}: {e.strerror}") from None
    if size > MAX_CONFIG_BYTES:
        raise InputError(f"config {p} is {size} bytes, more than the limit {MAX_CONFIG_BYTES}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"config {p} is not a JSON file: {e}") from None
    if not isinstance(doc, dict):
        raise InputError(f"config {p} must be a JSON object")
    return doc


def _int(config: Mapping[str, Any], *keys: str) -> int:
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    raise InputError(f"config lacks a positive integer {' or '.join(keys)}")


def _prefix(names: set[str], suffix: str, candidates: tuple[str, ...]) -> str:
    for p in candidates:
        if p + suffix in names:
            return p
    raise InputError(f"the weights hold no {suffix!r} under any of the prefixes {', '.join(repr(c) for c in candidates)}")


def _check_layers(names: set[str], layers: int, probe: str) -> None:
    """The config's layer count matches the weights (``probe``: one tensor name with ``{i}``): a
    layer the config does not name would be left unrotated, and the function broken."""
    if probe.format(i=layers - 1) not in names or probe.format(i=layers) in names:
        have = sum(1 for i in range(len(names) + 1) if probe.format(i=i) in names)
        raise InputError(f"config says {layers} layers, the weights hold {have} ({probe.format(i='N')})")


def _head(names: set[str], head: str, table: str, tied: bool) -> tuple[str | None, str | None]:
    """The output head's name (None: a bare base model) and the table it is tied to."""
    if head in names:
        return head, (table if tied else None)
    if tied:
        return head, table  # stored once under the table's name; folding writes the head
    return None, None


def _llama(config: Mapping[str, Any], names: set[str]) -> StreamFamily:
    P = _prefix(names, "embed_tokens.weight", ("model.", ""))
    d, layers = _int(config, "hidden_size"), _int(config, "num_hidden_layers")
    _check_layers(names, layers, P + "layers.{i}.self_attn.q_proj.weight")
    emb = f"{P}embed_tokens.weight"
    stream, norms = [(emb, 1)], []
    for i in range(layers):
        L = f"{P}layers.{i}."
        att = tuple(Reader(f"{L}self_attn.{n}_proj.weight", 1) for n in "qkv")
        mlp = tuple(Reader(f"{L}mlp.{n}_proj.weight", 1) for n in ("gate", "up"))
        norms += [Norm(f"{L}input_layernorm.weight", None, att), Norm(f"{L}post_attention_layernorm.weight", None, mlp)]
        stream += [(r.weight, 1) for r in att + mlp]
        stream += [(f"{L}self_attn.o_proj.weight", 0), (f"{L}mlp.down_proj.weight", 0)]
    head, tied = _head(names, "lm_head.weight", emb, bool(config.get("tie_word_embeddings", False)))
    final = (Reader(head, 1),) if head else ()
    norms.append(Norm(f"{P}norm.weight", None, final))
    stream += [(head, 1)] if head else []
    return StreamFamily(str(config["model_type"]), "rms", d, tuple(norms), tuple(stream), ((emb, 1),), head, tied)


def _gpt2(config: Mapping[str, Any], names: set[str]) -> StreamFamily:
    P = _prefix(names, "wte.weight", ("transformer.", ""))
    d, layers = _int(config, "n_embd", "hidden_size"), _int(config, "n_layer", "num_hidden_layers")
    _check_layers(names, layers, P + "h.{i}.attn.c_attn.weight")
    wte, wpe = f"{P}wte.weight", f"{P}wpe.weight"
    stream, norms = [(wte, 1), (wpe, 1)], []
    for i in range(layers):
        H = f"{P}h.{i}."
        # GPT-2's Conv1D stores weights as (in, out): readers have the stream on axis 0,
        # writers on axis 1
        att, mlp = (Reader(f"{H}attn.c_attn.weight", 0),), (Reader(f"{H}mlp.c_fc.weight", 0),)
        norms += [Norm(f"{H}ln_1.weight", f"{H}ln_1.bias", att), Norm(f"{H}ln_2.weight", f"{H}ln_2.bias", mlp)]
        stream += [(f"{H}attn.c_attn.weight", 0), (f"{H}mlp.c_fc.weight", 0)]
        stream += [(f"{H}attn.c_proj.weight", 1), (f"{H}attn.c_proj.bias", 0)]
        stream += [(f"{H}mlp.c_proj.weight", 1), (f"{H}mlp.c_proj.bias", 0)]
        stream += [(f"{H}ln_1.bias", 0), (f"{H}ln_2.bias", 0)]  # once folded: stream vectors
    head, tied = _head(names, "lm_head.weight", wte, bool(config.get("tie_word_embeddings", True)))
    norms.append(Norm(f"{P}ln_f.weight", f"{P}ln_f.bias", (Reader(head, 1),) if head else ()))
    stream += [(f"{P}ln_f.bias", 0)] + ([(head, 1)] if head else [])
    return StreamFamily("gpt2", "layer", d, tuple(norms), tuple(stream), ((wte, 1), (wpe, 1)), head, tied)


def family_from_config(config: Mapping[str, Any], names: Iterable[str]) -> StreamFamily:
    """The stream-side tensors of a model whose weights hold ``names``, from its config.

    Refuses (InputError, naming the reason) post-LN models, families not understood here, and
    configs that change the norm's placement (GPT-2's ``scale_attn_by_inverse_layer_idx`` is
    harmless; ``add_cross_attention`` adds another stream and is refused).
    """
    if not isinstance(config, Mapping):
        raise InputError("config must be a JSON object")
    kind = config.get("model_type")
    if not isinstance(kind, str):
        raise InputError("config lacks model_type: cannot tell which norms the model has")
    names = set(names)
    if kind in POST_LN_FAMILIES:
        raise InputError(f"{kind} is a post-LayerNorm model: it normalizes the residual stream itself with "
                         "per-dimension weights after every addition, so it has no rotation symmetry "
                         "beyond permutations (re-synchronize it with the permutation spec alone)")
    if kind in RMS_FAMILIES:
        return _llama(config, names)
    if kind in LAYERNORM_FAMILIES:
        if config.get("add_cross_attention"):
            raise InputError("gpt2 with cross-attention reads a second stream: rotations of it are not supported")
        return _gpt2(config, names)
    known = ", ".join(RMS_FAMILIES + LAYERNORM_FAMILIES)
    raise InputError(f"residual-stream rotations are not supported for model_type {kind!r} (supported: {known})")


def check_family(family: StreamFamily, state_dict: Mapping[str, Any], which: str = "model") -> None:
    """Every named tensor is present (a tied head may be absent) with a stream axis of size d."""
    wanted = list(family.stream) + [(n.weight, 0) for n in family.norms]
    for name, axis in wanted:
        if name == family.head and family.tied_to and name not in state_dict:
            continue
        t = state_dict.get(name)
        if t is None:
            raise InputError(f"{which}: tensor {name!r} of the {family.name} stream is missing")
        if not t.is_floating_point():
            raise InputError(f"{which}: tensor {name!r} is {t.dtype}, not floating point")
        if t.dim() <= axis or t.shape[axis] != family.hidden:
            raise InputError(f"{which}: tensor {name!r} has shape {tuple(t.shape)}; its axis {axis} should be "
                             f"the stream (size {family.hidden})")
