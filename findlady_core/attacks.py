"""Seedable perturbations of a state dict (paper sections 3.1 and 3.4).

Every function returns a NEW dict and leaves its input untouched; tensors an attack does not
touch are shared with the input, not copied (treat tensors as immutable). Attacks compose
with each other and with the permutation attack in any order.

Targets: with a group, that group's own parameters (the paper's
"l-th layer": its weight rows, bias and norm parameters); otherwise every floating tensor of
two or more dimensions. BatchNorm running statistics are never targets: they are estimates
of activations, not weights, and noise could make a variance negative.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from findlady_core.errors import InputError
from findlady_core.permute import (
    apply_permutations,
    random_permutations,
    recovering_permutations,
)
from findlady_core.spec import Spec

StateDict = Mapping[str, torch.Tensor]
def attack_targets(state_dict: StateDict, spec: Spec | None = None, group: str | None = None) -> list[str]:
    """Names of the tensors an attack hits, in state-dict order.

    With ``group`` (needs ``spec``): the floating tensors of that group's ``role: out``
    members. Without: every floating tensor with two or more dimensions.
    """
    if group is None:
        return [k for k, t in state_dict.items() if t.is_floating_point() and t.dim() >= 2]
    if spec is None:
        raise InputError(f"attack on group {group!r} needs a spec")
    g = spec.group(group)
    own = set()
    for m in g.own_members:
        t = state_dict.get(m.tensor)
        if t is None:
            raise InputError(f"group {group!r}: tensor {m.tensor!r} is not in the weights")
        if t.is_floating_point() and t.dim() >= 1:
            own.add(m.tensor)
    if not own:
        raise InputError(f"group {group!r} has no floating parameters of its own to attack")
    return [k for k in state_dict if k in own]


def _check_targets(state_dict: StateDict, targets: list[str]) -> None:
    if isinstance(targets, str):
        raise InputError("targets must be a list of tensor names, not a string")
    if not targets:
        raise InputError("no tensors to attack (empty target list)")
    if len(set(targets)) != len(targets):
        raise InputError("a tensor is listed twice in the targets")
    for name in targets:
        t = state_dict.get(name)
        if t is None:
            raise InputError(f"attack target {name!r} is not in the weights")
        if not t.is_floating_point():
            raise InputError(f"attack target {name!r} is {t.dtype}, not floating point")


def _tensor_seed(seed: int, name: str) -> int:
    """A seed per (seed, tensor name): a tensor's noise does not depend on the other targets."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian_noise(state_dict: StateDict, omega: float, *, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """``w + N(0, (omega * std(w))^2)`` per target tensor, std over the whole tensor (paper 3.1)."""
    if not isinstance(omega, (int, float)) or isinstance(omega, bool) or not math.isfinite(omega) or omega < 0:
        raise InputError(f"noise level omega must be a finite number >= 0, got {omega!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    _check_targets(state_dict, targets)
    out = dict(state_dict)
    for name in targets:
        t = state_dict[name]
        w = t.detach().to(torch.float32)
        std = float(w.std(correction=0)) if w.numel() else 0.0
        gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device)
        out[name] = (w + noise * (omega * std)).to(t.dtype)
    return out


def quantize(state_dict: StateDict, bits: int, *, targets: list[str]) -> dict[str, torch.Tensor]:
    """Uniform quantization of each target to ``2**bits`` levels between its min and max,
    dequantized back to its dtype (paper 3.1)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
        raise InputError(f"bits must be an integer in [1, 32], got {bits!r}")
    _check_targets(state_dict, targets)
    out = dict(state_dict)
    levels = 2**bits - 1  # number of steps between min and max
    for name in targets:
        t = state_dict[name]
        if t.numel() == 0:
            continue
        # float64: 2**32 levels need more than float32's 24-bit mantissa.
        w = t.detach().to(torch.float64)
        lo, hi = w.min(), w.max()
        if hi == lo:
            out[name] = t.clone()
            continue
        step = (hi - lo) / levels
        q = torch.round((w - lo) / step).clamp_(0, levels)
        out[name] = (lo + q * step).to(t.dtype)
    return out


def prune(
    state_dict: StateDict,
    fraction: float,
    *,
    targets: list[str],
    scope: Literal["layer", "global"] = "layer",
) -> dict[str, torch.Tensor]:
    """Magnitude pruning: zero the ``fraction`` of smallest ``|w|`` per tensor (``layer``) or
    across all targets together (``global``). Exactly ``round(fraction * n)`` entries are zeroed;
    ties are broken by position so the result is deterministic."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
        raise InputError(f"prune fraction must be in [0, 1), got {fraction!r}")
    if scope not in ("layer", "global"):
        raise InputError(f"prune scope must be 'layer' or 'global', got {scope!r}")
    _check_targets(state_dict, targets)
    out = dict(state_dict)
    if scope == "layer":
        for name in targets:
            t = state_dict[name]
            mask = _smallest_mask(t.detach().abs().flatten().to(torch.float32), fraction)
            out[name] = t.detach().flatten().masked_fill(mask, 0).view_as(t)
        return out
    flat = torch.cat([state_dict[n].detach().abs().flatten().to(torch.float32).cpu() for n in targets])
    mask = _smallest_mask(flat, fraction)
    start = 0
    for name in targets:
        t = state_dict[name]
        m = mask[start:start + t.numel()].to(t.device)
        start += t.numel()
        out[name] = t.detach().flatten().masked_fill(m, 0).view_as(t)
    return out


def _smallest_mask(mag: torch.Tensor, fraction: float) -> torch.Tensor:
    k = round(fraction * mag.numel())
    mask = torch.zeros(mag.numel(), dtype=torch.bool, device=mag.device)
    if k:
        mask[torch.argsort(mag, stable=True)[:k]] = True
    return mask


def scale_neurons(
    state_dict: StateDict, spec: Spec, group: str, neurons: list[int], k: float
) -> dict[str, torch.Tensor]:
    """``w -> (1 + k) w`` on the given neurons' own parameters (paper 3.4).

    For each ``role: out`` member of ``group`` (except BatchNorm running statistics), the index
    range of each neuron along the member's axis (its row, its bias entry, or its whole block)
    is scaled; everything else is unchanged.
    """
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not math.isfinite(k):
        raise InputError(f"scale k must be a finite number, got {k!r}")
    g = spec.group(group)
    if not neurons:
        raise InputError("no neurons given to scale")
    for i in neurons:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < g.size:
            raise InputError(f"neuron {i!r} is not in group {group!r} (size {g.size})")
    if len(set(neurons)) != len(neurons):
        raise InputError("a neuron is listed twice")
    targets = set(attack_targets(state_dict, spec, group))
    spec.select([group]).validate(state_dict)
    idx_neurons = torch.tensor(sorted(neurons), dtype=torch.int64)
    out = dict(state_dict)
    for m in g.out_members:
        if m.tensor not in targets:
            continue
        t = out[m.tensor]  # a tensor may carry two members of one group only on distinct axes
        idx = (m.offset + idx_neurons.view(-1, 1) * m.block + torch.arange(m.block)).flatten().to(t.device)
        new = t.detach().clone()
        sel = new.index_select(m.axis, idx)
        new.index_copy_(m.axis, idx, sel * (1 + k))
        out[m.tensor] = new
    return out


@dataclass(frozen=True)
class PermutationAttack:
    """A permuted state dict, the attack's permutations ``q`` and the recovering ``p`` (truth)."""

    state_dict: dict[str, torch.Tensor]
    attack: dict[str, torch.Tensor]
    truth: dict[str, torch.Tensor]


def permute(state_dict: StateDict, spec: Spec, groups: list[str] | None = None, seed: int = 0) -> PermutationAttack:
    """Permute the named groups (all when None) at random; function-preserving.

    ``truth`` holds, per group, the permutation that re-synchronizes the result (the
    convention of ``findlady_core.permute``): applying it with ``apply_permutations`` gives back ``state_dict`` exactly.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if groups is not None and not groups:
        raise InputError("no groups to permute (empty list)")
    spec.validate(state_dict)
    attack = random_permutations(spec, groups, seed=seed)
    permuted = apply_permutations(state_dict, spec, attack)
    truth = recovering_permutations(spec, attack, {k: v.shape for k, v in state_dict.items()})
    return PermutationAttack(permuted, attack, truth)


# ---------------------------------------------------------------------------------------------
# the registry: each attack of ``findlady attack`` with its command-line options as plain data
#
# Adding an attack is one decorated function here: the CLI builds its flags (``Option.type``
# names one of the CLI's value parsers), its checks and its step text from ``REGISTRY``;
# the robustness scripts of the checkout apply attacks through it too.


@dataclass(frozen=True)
class Option:
    flag: str  # "--noise"
    type: str  # a value parser of the CLI: path, finite, nonneg, fraction, bits, int_list, names
    help: str
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass
class Context:
    """What every attack step may use: the spec, ``--group``, ``--seed``, the truth so far."""

    spec: Spec | None
    group: str | None = None
    seed: int = 0
    targets: list[str] | None = None  # explicit target tensors; default: ``attack_targets``
    truth: dict[str, torch.Tensor] = field(default_factory=dict)
    origins: dict[str, torch.Tensor] = field(default_factory=dict)  # widened groups: reference neuron per position

    def target_names(self, state_dict: StateDict) -> list[str]:
        return self.targets if self.targets is not None else attack_targets(state_dict, self.spec, self.group)

    def where(self, state_dict: StateDict) -> str:
        return f"group {self.group}" if self.group else f"{len(self.target_names(state_dict))} tensors"


Values = Mapping[str, Any]  # option dest -> value (None: not given)
Runner = Callable[[dict[str, torch.Tensor], Values, Context], tuple[dict[str, torch.Tensor], str]]


@dataclass(frozen=True)
class Registered:
    name: str
    step: float  # position in the pipeline: lower runs first
    options: tuple[Option, ...]  # the first one is the attack's own: given means "run it"
    doc: str  # one line of ``findlady attack --help``'s step list
    run: Runner  # -> (new state dict, the step's text)
    check: Callable[[Values, str | None], None] | None = None  # before any work: (values, --group)


REGISTRY: dict[str, Registered] = {}


def register(name: str, *, step: float, options: tuple[Option, ...], doc: str,
             check: Callable[[Values, str | None], None] | None = None) -> Callable[[Runner], Runner]:  # fmt: skip
    def add(run: Runner) -> Runner:
        REGISTRY[name] = Registered(name, step, options, doc, run, check)
        return run

    return add


def pipeline(values: Values) -> list[Registered]:
    """The registered attacks asked for in ``values``, in pipeline order."""
    chosen = [a for a in REGISTRY.values() if values.get(a.options[0].dest) is not None]
    return sorted(chosen, key=lambda a: a.step)


def check_values(values: Values, group: str | None) -> None:
    if not pipeline(values):
        flags = ", ".join(a.options[0].flag for a in REGISTRY.values())
        raise InputError(f"nothing to do: give at least one of {flags}")
    for a in REGISTRY.values():
        if a.check is not None:
            a.check(values, group)


def run_pipeline(state_dict: StateDict, values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply every attack asked for, in order; ``ctx.truth`` ends as the recovering permutations."""
    sd = dict(state_dict)
    steps = []
    for a in pipeline(values):
        sd, text = a.run(sd, values, ctx)
        steps.append(text)
    return sd, steps


def _check_permute(values: Values, group: str | None) -> None:
    names = values.get("permute")
    if names is not None and "all" in names and len(names) > 1:
        raise InputError("--permute takes 'all' or group names, not both")


def _check_scale(values: Values, group: str | None) -> None:
    if (values.get("scale") is None) != (values.get("neurons") is None):
        raise InputError("--scale and --neurons go together")
    if values.get("scale") is not None and group is None:
        raise InputError("--scale needs --group (the group whose --neurons are scaled)")


@register("permute", step=2, check=_check_permute,
          doc="--permute: random permutation of all groups or the named ones (function-preserving);",
          options=(Option("--permute", "names", "permute all groups ('all') or the named groups (give REF before this option)",
                          "all|GROUP"),))  # fmt: skip
def _run_permute(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    assert ctx.spec is not None
    names = values["permute"]
    groups = None if "all" in names else list(dict.fromkeys(names))
    pa = permute(sd, ctx.spec, groups, seed=ctx.seed)
    ctx.truth = pa.truth
    return pa.state_dict, f"permuted {len(ctx.spec.groups) if groups is None else len(groups)} group(s)"


@register("noise", step=3, doc="--noise OMEGA: Gaussian noise of std OMEGA*std(tensor);",
          options=(Option("--noise", "nonneg", "Gaussian noise level (relative to each tensor's std)", "OMEGA"),))
def _run_noise(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    out = gaussian_noise(sd, values["noise"], targets=ctx.target_names(sd), seed=ctx.seed)
    return out, f"noise omega={values['noise']:g} on {ctx.where(sd)}"


@register("quantize", step=4, doc="--quantize B: uniform quantization to 2**B levels per tensor;",
          options=(Option("--quantize", "bits", "quantize to B bits", "B"),))
def _run_quantize(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    out = quantize(sd, values["quantize"], targets=ctx.target_names(sd))
    return out, f"quantized to {values['quantize']} bits on {ctx.where(sd)}"


@register("prune", step=5, doc="--prune T: zero the fraction T of smallest |w| per tensor.",
          options=(Option("--prune", "fraction", "fraction of weights to prune by magnitude", "T"),))
def _run_prune(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    out = prune(sd, values["prune"], targets=ctx.target_names(sd))
    return out, f"pruned {values['prune']:g} on {ctx.where(sd)}"


@register("scale", step=1, check=_check_scale,
          doc="--scale K --neurons I,J,...: w -> (1+K) w on those neurons of --group; the indices\n"
              "     are REFERENCE indices (the scaling happens before the permutation);",
          options=(Option("--scale", "finite", "scale the --neurons of --group by 1+K", "K"),
                   Option("--neurons", "int_list", "reference indices of the neurons to scale", "I,J,...")))  # fmt: skip
def _run_scale(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    assert ctx.spec is not None and ctx.group is not None
    out = scale_neurons(sd, ctx.spec, ctx.group, values["neurons"], values["scale"])
    return out, f"scaled {len(values['neurons'])} neurons of {ctx.group} by 1{values['scale']:+g}"


def _reset_stream_truth(ctx: Context, family: Any) -> None:
    """After a rotation the stream is one Q away from the reference, permutation included: undoing
    Q puts it back in the reference's order, so the stream group's recovering permutation is the
    identity."""
    from findlady_core.rotation.estimate import stream_group

    name = stream_group(ctx.spec, family)
    if name is not None and name in ctx.truth:
        ctx.truth[name] = torch.arange(ctx.spec.group(name).size)


# after the permutation (a tied head is permuted with its table before folding unties it),
# before noise, quantization and pruning
@register("rotate_residual", step=2.5,
          doc="--rotate-residual CONFIG: fold the norms and rotate the residual stream by a seeded Q\n"
              "     (RMSNorm: any orthogonal Q; pre-LayerNorm: Q fixing the ones vector; function-preserving;\n"
              "     CONFIG is the model's config.json or its folder; a tied head comes out untied);",
          options=(Option("--rotate-residual", "path", "rotate the residual stream of the transformer described by CONFIG",
                          "CONFIG"),))  # fmt: skip
def _run_rotate_residual(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.rotation import family_from_config, load_config, rotate_residual

    family = family_from_config(load_config(values["rotate_residual"]), sd.keys())
    out, _ = rotate_residual(sd, family, seed=ctx.seed)
    _reset_stream_truth(ctx, family)
    kind = "orthogonal Q" if family.norm == "rms" else "Q fixing the ones vector"
    return out, f"rotated the {family.hidden}-dimensional residual stream of {family.name} ({kind}, norms folded)"


# structural obfuscation (split, dummy, random scales, head maps) registers itself here
from findlady_core import obfuscate as _obfuscate  # noqa: E402,F401
