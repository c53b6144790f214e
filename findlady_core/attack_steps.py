"""The steps of ``findlady attack``: one decorated runner per attack, its options as plain data.

Adding an attack is one decorated function here (its implementation lives with its kind:
``findlady_core.attacks`` for the paper's perturbations, ``findlady_core.obfuscate`` for
structural obfuscation, ``findlady_core.rotation`` for residual rotations). The CLI builds the
attack's flags (``Option.type`` names one of the CLI's value parsers), its checks and its step
text from ``REGISTRY``; the robustness scripts of the checkout apply attacks through it too.

This module imports neither torch nor the implementations: a runner imports what it needs when
it runs, so ``findlady attack --help`` reads the registry in a fraction of torch's import time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from findlady_core.errors import InputError

if TYPE_CHECKING:
    import torch

    from findlady_core.spec import Spec

    StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Option:
    flag: str  # "--noise"
    type: str  # a value parser of the CLI: path, finite, nonneg, fraction, bits, int_list, names, flag, ...
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
    targets: list[str] | None = None  # explicit target tensors; default: ``attacks.attack_targets``
    truth: dict[str, torch.Tensor] = field(default_factory=dict)
    origins: dict[str, torch.Tensor] = field(default_factory=dict)  # widened groups: reference neuron per position

    def target_names(self, state_dict: StateDict) -> list[str]:
        from findlady_core.attacks import attack_targets

        return self.targets if self.targets is not None else attack_targets(state_dict, self.spec, self.group)

    def where(self, state_dict: StateDict) -> str:
        return f"group {self.group}" if self.group else f"{len(self.target_names(state_dict))} tensors"


Values = Mapping[str, Any]  # option dest -> value (None: not given)
Runner = Callable[[dict[str, "torch.Tensor"], Values, Context], tuple[dict[str, "torch.Tensor"], str]]


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


# ---------------------------------------------------------------------------------------------
# the paper's attacks (findlady_core.attacks)


@register("permute", step=2, check=_check_permute,
          doc="--permute: random permutation of all groups or the named ones (function-preserving);",
          options=(Option("--permute", "names", "permute all groups ('all') or the named groups (give REF before this option)",
                          "all|GROUP"),))  # fmt: skip
def _run_permute(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.attacks import permute

    assert ctx.spec is not None
    names = values["permute"]
    groups = None if "all" in names else list(dict.fromkeys(names))
    pa = permute(sd, ctx.spec, groups, seed=ctx.seed)
    ctx.truth = pa.truth
    return pa.state_dict, f"permuted {len(ctx.spec.groups) if groups is None else len(groups)} group(s)"


@register("noise", step=3, doc="--noise OMEGA: Gaussian noise of std OMEGA*std(tensor);",
          options=(Option("--noise", "nonneg", "Gaussian noise level (relative to each tensor's std)", "OMEGA"),))
def _run_noise(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.attacks import gaussian_noise

    out = gaussian_noise(sd, values["noise"], targets=ctx.target_names(sd), seed=ctx.seed)
    return out, f"noise omega={values['noise']:g} on {ctx.where(sd)}"


@register("quantize", step=4, doc="--quantize B: uniform quantization to 2**B levels per tensor;",
          options=(Option("--quantize", "bits", "quantize to B bits", "B"),))
def _run_quantize(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.attacks import quantize

    out = quantize(sd, values["quantize"], targets=ctx.target_names(sd))
    return out, f"quantized to {values['quantize']} bits on {ctx.where(sd)}"


@register("prune", step=5, doc="--prune T: zero the fraction T of smallest |w| per tensor.",
          options=(Option("--prune", "fraction", "fraction of weights to prune by magnitude", "T"),))
def _run_prune(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.attacks import prune

    out = prune(sd, values["prune"], targets=ctx.target_names(sd))
    return out, f"pruned {values['prune']:g} on {ctx.where(sd)}"


@register("scale", step=1, check=_check_scale,
          doc="--scale K --neurons I,J,...: w -> (1+K) w on those neurons of --group; the indices\n"
              "     are REFERENCE indices (the scaling happens before the permutation);",
          options=(Option("--scale", "finite", "scale the --neurons of --group by 1+K", "K"),
                   Option("--neurons", "int_list", "reference indices of the neurons to scale", "I,J,...")))  # fmt: skip
def _run_scale(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.attacks import scale_neurons

    assert ctx.spec is not None and ctx.group is not None
    out = scale_neurons(sd, ctx.spec, ctx.group, values["neurons"], values["scale"])
    return out, f"scaled {len(values['neurons'])} neurons of {ctx.group} by 1{values['scale']:+g}"


# ---------------------------------------------------------------------------------------------
# residual rotations (findlady_core.rotation): after the permutation (a tied head is permuted
# with its table before folding unties it), before noise, quantization and pruning


def _reset_stream_truth(ctx: Context, family: Any) -> None:
    """After a rotation the stream is one Q away from the reference, permutation included: undoing
    Q puts it back in the reference's order, so the stream group's recovering permutation is the
    identity."""
    import torch

    from findlady_core.rotation.estimate import stream_group

    name = stream_group(ctx.spec, family)
    if name is not None and name in ctx.truth:
        ctx.truth[name] = torch.arange(ctx.spec.group(name).size)


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


# ---------------------------------------------------------------------------------------------
# structural obfuscation (findlady_core.obfuscate): after noise, quantization and pruning


@register("scale-random", step=6, doc="--scale-random: every neuron of every width group (or --group) times a random\n"
          "     c in [0.25, 4], its consumers' weights times 1/c (function-preserving across ReLU);",
          options=(Option("--scale-random", "flag", "rescale every neuron at random (function-preserving across ReLU)"),))
def _run_scale_random(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.obfuscate import scale_random

    assert ctx.spec is not None
    return scale_random(sd, ctx.spec, group=ctx.group, seed=ctx.seed), "rescaled every neuron at random"


@register("scale-linear", step=6, doc="--scale-linear: random c != 0 (|c| in [0.25, 4]) on linear paths: SwiGLU's up rows with\n"
          "     its down columns, conv channels with their BatchNorm statistics (and BN weight);",
          options=(Option("--scale-linear", "flag", "rescale SwiGLU up/down and conv channels through BatchNorm at random"),))
def _run_scale_linear(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.canon.scales import scale_linear, scale_units

    assert ctx.spec is not None
    if not scale_units(ctx.spec, {k: v.shape for k, v in sd.items()}):
        raise InputError("--scale-linear: the spec has no SwiGLU block (an up_proj beside a gate) and no conv with BatchNorm")
    return scale_linear(sd, ctx.spec, seed=ctx.seed), "rescaled SwiGLU up/down and conv channels through BatchNorm at random"


@register("scale-norms", step=6, doc="--scale-norms: every norm weight (and LayerNorm bias) of a pre-norm transformer (llama,\n"
          "     mistral, qwen2, gpt2) times a random c != 0 per channel, the readers' input columns times 1/c;",
          options=(Option("--scale-norms", "flag", "rescale the norm weights of a pre-norm transformer into the projections reading them"),))
def _run_scale_norms(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.canon.norms import foldable_norms, scale_norms

    out = scale_norms(sd, seed=ctx.seed)
    return out, f"rescaled the weights of {len(foldable_norms(sd))} norms into their readers at random"


@register("head-maps", step=6, doc="--head-maps orthogonal|general: an invertible map per attention head on q/k and v/o;",
          options=(Option("--head-maps", "head_map_kind", "invertible maps inside every attention head",
                          "orthogonal|general"),))
def _run_head_maps(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.obfuscate import head_maps

    assert ctx.spec is not None
    kind = values["head_maps"]
    return head_maps(sd, ctx.spec, kind, seed=ctx.seed), f"{kind} maps inside every attention head"


@register("split", step=7, doc="--split FRACTION: NeuronSplit, that fraction of each width group's neurons split in two;",
          options=(Option("--split", "split_fraction", "split this fraction of every width group's neurons", "FRACTION"),))
def _run_split(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.obfuscate import split_neurons

    assert ctx.spec is not None
    out = split_neurons(sd, ctx.spec, values["split"], group=ctx.group, seed=ctx.seed, ctx=ctx)
    return out, f"split {values['split']:g} of the neurons of {len(ctx.origins)} group(s)"


@register("dummy", step=8, doc="--dummy N: NeuronClique, N dummy neurons per width group (outgoing weights cancel).",
          options=(Option("--dummy", "dummies", "add N >= 2 dummy neurons to every width group", "N"),))
def _run_dummy(sd: dict[str, torch.Tensor], values: Values, ctx: Context) -> tuple[dict[str, torch.Tensor], str]:
    from findlady_core.obfuscate import dummy_neurons

    assert ctx.spec is not None
    out = dummy_neurons(sd, ctx.spec, values["dummy"], group=ctx.group, seed=ctx.seed, ctx=ctx)
    return out, f"{values['dummy']} dummy neurons in each of {len(ctx.origins)} group(s)"
