"""Shared pieces of the benchmark scripts: the models under test with their task metrics, the
three re-synchronization methods side by side, and small table/plot helpers.

A *subject* is a model plus everything a robustness run needs: its clean state dict, its
permutation spec, the group the paper permutes (the penultimate layer), a task metric computed
on a state dict, and optionally a fine-tuning attack. Metrics say which way is better and how
much of the clean value an attacked model keeps (``retained``), so "Psi = 100 wherever the
attacked model keeps >= 95% of its clean metric" can be checked the same way on every model.

The norm-ranking baseline of the paper's section 3.2 (Fig. 4) lives here, not in the library:
it is shown only to explain why ranking fails.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from findlady_core.errors import InputError
from findlady_core.permute import apply_group, psi
from findlady_core.spec import Group, Spec

StateDict = Mapping[str, Tensor]
METHODS = ("findlady", "paper", "rank")
METHOD_LABELS = {"findlady": "FindLady", "paper": "paper (argmax)", "rank": "norm ranking"}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results"


# ---------------------------------------------------------------------------------------------
# the norm-ranking baseline (paper section 3.2, Fig. 4)


def own_rows(t: Tensor, g: Group, axis: int, offset: int, block: int) -> Tensor:
    """One row per neuron of ``g``: its slice of ``t`` along ``axis``, flattened."""
    x = t.narrow(axis, offset, g.size * block).movedim(axis, 0)
    return x.reshape(g.size, -1)


def own_members(g: Group, sd: StateDict) -> list[Any]:
    """The neuron's own weights, as the paper's Algorithm 1 reads them: the ``role: out``
    members of two or more dimensions (weight rows), else every ``out`` member."""
    return [m for m in g.out_members if sd[m.tensor].dim() >= 2] or list(g.out_members) or list(g.members)


def l1_norms(sd: StateDict, g: Group) -> Tensor:
    """l1 norm of each neuron's own weights (float64)."""
    total = torch.zeros(g.size, dtype=torch.float64)
    for m in own_members(g, sd):
        total += own_rows(sd[m.tensor], g, m.axis, m.offset, m.block).abs().double().sum(dim=1)
    return total


def norm_rank(reference: StateDict, suspect: StateDict, spec: Spec, groups: list[str] | None = None) -> dict[str, Tensor]:
    """Match neurons by the rank of the l1 norm of their own weights (paper section 3.2).

    A row's l1 norm does not change when the row's other axes are permuted, so each group is
    ranked on its own; groups are still applied in spec order so that dims nested inside heads
    are ranked inside the right head. Returns ``p`` per group (the convention of ``findlady_core.permute``).
    """
    active = spec.select(groups) if groups is not None else spec
    work = dict(suspect)
    out: dict[str, Tensor] = {}
    for g in active.groups:
        order_r = torch.argsort(l1_norms(reference, g), stable=True)
        order_s = torch.argsort(l1_norms(work, g), stable=True)
        p = torch.empty(g.size, dtype=torch.int64)
        p[order_r] = order_s  # the k-th smallest reference neuron sits where the k-th smallest suspect one is
        out[g.name] = p
        apply_group(work, g, p)
    return out


def min_norm_gap(sd: StateDict, g: Group) -> float:
    """Smallest gap between two neurons' l1 norms: how little it takes to swap two ranks."""
    n = torch.sort(l1_norms(sd, g)).values
    return float((n[1:] - n[:-1]).min()) if n.numel() > 1 else math.inf


DEAD_RELATIVE_NORM = 1e-4


def live_neurons(sd: StateDict, spec: Spec) -> dict[str, Tensor]:
    """Per group, a mask of the neurons whose own weights are not negligible: l2 norm above
    ``DEAD_RELATIVE_NORM`` times the group's median. Dead channels (weights decayed to ~1e-7, as
    EfficientNet-Lite0 has) carry no direction, so any perturbation of the weights lets them
    trade places; Psi over the live neurons says whether anything else went wrong."""
    out = {}
    for g in spec.groups:
        n = torch.zeros(g.size, dtype=torch.float64)
        for m in own_members(g, sd):
            n += own_rows(sd[m.tensor], g, m.axis, m.offset, m.block).double().pow(2).sum(dim=1)
        n = n.sqrt()
        out[g.name] = n > DEAD_RELATIVE_NORM * n.median()
    return out


def psi_live(truth: Mapping[str, Tensor], found: Mapping[str, Tensor], live: Mapping[str, Tensor]) -> float:
    """Psi restricted to live neurons (reference indices)."""
    hit = total = 0
    for name, t in truth.items():
        mask = live[name]
        hit += int(((torch.as_tensor(t) == torch.as_tensor(found[name])) & mask).sum())
        total += int(mask.sum())
    return 100.0 * hit / total if total else 100.0


def run_methods(
    reference: StateDict, suspect: StateDict, spec: Spec, truth: Mapping[str, Tensor], groups: list[str] | None,
    methods: Sequence[str] = METHODS, live: Mapping[str, Tensor] | None = None,
) -> dict[str, tuple[float, float]]:
    """Psi and seconds of each method on one suspect: ``{method: (psi, seconds)}``; with
    ``live`` (see ``live_neurons``) also ``{method + "_live": (psi over live neurons, seconds)}``."""
    from findlady_core.resync import resync

    if groups is not None:  # Psi over the permuted groups only, not the untouched ones
        truth = {g: truth[g] for g in groups}
    out = {}
    for method in methods:
        t = time.perf_counter()
        if method == "rank":
            perms = norm_rank(reference, suspect, spec, groups)
        else:
            perms = resync(reference, suspect, spec, method=method, groups=groups, device="cpu").permutations
        seconds = time.perf_counter() - t
        out[method] = (psi(spec, truth, perms)[1], seconds)
        if live is not None:
            out[f"{method}_live"] = (psi_live(truth, perms, live), seconds)
    return out


# ---------------------------------------------------------------------------------------------
# subjects: models under test with their task metrics


@dataclass
class Metric:
    """A task metric on state dicts. ``higher_is_better`` says which way is good."""

    name: str
    unit: str
    higher_is_better: bool
    fn: Callable[[StateDict], float]
    # value -> "goodness" in [0, ...] whose ratio to the clean one is the retained fraction
    goodness: Callable[[float], float] = lambda v: v

    def __call__(self, sd: StateDict) -> float:
        return self.fn(sd)

    def retained(self, value: float, clean: float) -> float:
        """Fraction of the clean task performance the attacked model keeps (1 = all of it)."""
        c = self.goodness(clean)
        return self.goodness(value) / c if c else float("nan")

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


@dataclass
class Subject:
    """A model under test (see module docstring)."""

    key: str
    label: str
    seed: int
    state_dict: dict[str, Tensor]
    spec: Spec
    paper_group: str
    metric: Metric
    finetune: Callable[[dict[str, Tensor], float, int], dict[str, Tensor]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def group_of(spec: Spec, module: str) -> str:
    """Name of the group whose own parameters include ``<module>.weight`` (the penultimate
    layer of the paper's setting; with residual adds that is the whole stream it writes)."""
    for g in spec.groups:
        if any(m.tensor == f"{module}.weight" for m in g.out_members):
            return g.name
    raise InputError(f"no group of the spec owns {module}.weight")


class ClassifierError:
    """Top-1 error (%) of an example model on its held-out split.

    When a state dict leaves every ``features.*`` tensor equal to the clean one, only the
    classifier head is run on cached features: the paper's setting attacks the penultimate layer
    alone, so this spares most of the convolutions.
    """

    def __init__(self, model: nn.Module, clean: StateDict, test_ds: Any):
        self.model = copy.deepcopy(model).eval()
        self.clean = clean
        self.x, self.y = test_ds.tensors[0], test_ds.tensors[1]
        self.features: Tensor | None = None
        if hasattr(self.model, "features") and hasattr(self.model, "classifier"):
            self.model.load_state_dict(clean)
            with torch.inference_mode():
                self.features = torch.flatten(self.model.features(self.x), 1)

    def _head_only(self, sd: StateDict) -> bool:
        return self.features is not None and all(
            sd[k] is v or torch.equal(sd[k], v) for k, v in self.clean.items() if k.startswith("features.")
        )

    @torch.inference_mode()
    def __call__(self, sd: StateDict) -> float:
        self.model.load_state_dict(sd)
        if self._head_only(sd):
            logits = self.model.classifier(self.features)  # type: ignore[operator]
        else:
            logits = torch.cat([self.model(self.x[i:i + 500]) for i in range(0, len(self.x), 500)])
        return 100.0 * float((logits.argmax(1) != self.y).float().mean())


def trained_subject(name: str, seed: int) -> Subject:
    """One of the example models trained here (``mlp``, ``vgg``, ``resnet``, ``mnist_cnn``)."""
    from findlady_core.trace import trace_spec
    from findlady_examples import data, models, train

    labels = {"mlp": "MLP (digits)", "vgg": "VGG-style (MNIST-5k)", "resnet": "ResNet-style BN (MNIST-5k)",
              "mnist_cnn": "MNIST CNN"}
    model, sd = train.trained(name, seed)
    spec = trace_spec(model, models.example_input(name))
    cfg = train.config(name)
    train_ds, test_ds = data.load(models.info(name).dataset, cfg.data_seed)
    err = ClassifierError(model, sd, test_ds)
    metric = Metric("error", "%", False, err, goodness=lambda v: 100.0 - v)

    def finetune(state: dict[str, Tensor], fraction: float, ft_seed: int) -> dict[str, Tensor]:
        return train.finetune(model, state, train_ds, fraction=fraction, original_epochs=cfg.epochs,
                              seed=ft_seed, lr=cfg.lr, batch_size=cfg.batch_size)

    return Subject(name, labels.get(name, name), seed, sd, spec, group_of(spec, models.info(name).penultimate),
                   metric, finetune, {"model": model})


def efficientnet_lite0() -> nn.Module:
    """The real EfficientNet-Lite0 with its shipped ImageNet weights (offline packages), eval mode."""
    from findlady_examples import models

    return models.efficientnet_lite0()


def efficientnet_subject(images_per_photo: int = 12) -> Subject:
    """EfficientNet-Lite0; metric: top-1 agreement (%) with the unattacked model on fixed crops
    of the two photos that ship with scikit-learn (no ImageNet labels are available here)."""
    from findlady_core.trace import trace_spec
    from findlady_examples import data

    model = efficientnet_lite0()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = trace_spec(model, torch.zeros(1, 3, 224, 224))
    x = data.sklearn_images(per_image=images_per_photo)
    work = copy.deepcopy(model).eval()
    with torch.inference_mode():
        clean_top1 = model(x).argmax(1)

    @torch.inference_mode()
    def agreement(state: StateDict) -> float:
        work.load_state_dict(state)
        return 100.0 * float((work(x).argmax(1) == clean_top1).float().mean())

    metric = Metric("top-1 agreement", "%", True, agreement)
    return Subject("efficientnet", "EfficientNet-Lite0", 0, sd, spec, group_of(spec, "_conv_head"), metric,
                   extra={"images": int(x.shape[0])})


def minilm_subject(sentences: int = 32) -> Subject:
    """all-MiniLM-L6-v2; metric: mean cosine between each Lee sentence's embedding (mean pooling,
    as sentence-transformers does) from the attacked and from the original model.

    Attacks are applied before the permutation, so the metric reads the attacked model in the
    original order of its hidden dimensions; the permuted suspect computes the same function
    with its output dimensions permuted, which is why the metric is not taken on the suspect.
    """
    from findlady_core.catalog import bert_spec
    from findlady_examples import data
    from findlady_examples.pretrained import load_minilm, load_minilm_tokenizer

    model, sd = load_minilm()
    sd = {k: v.detach().clone() for k, v in sd.items()}
    spec = bert_spec(sd)
    tok = load_minilm_tokenizer()
    enc = tok(data.lee_sentences(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).float()
    work = copy.deepcopy(model).eval()

    @torch.inference_mode()
    def embed(state: StateDict) -> Tensor:
        work.load_state_dict(state, strict=False)
        h = work(**enc).last_hidden_state
        e = (h * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(e, dim=1)

    clean = embed(sd)

    def cosine(state: StateDict) -> float:
        return float((embed(state) * clean).sum(1).mean())

    metric = Metric("embedding cosine", "", True, cosine)
    return Subject("minilm", "all-MiniLM-L6-v2", 0, sd, spec, "encoder.layer.5.mlp", metric,
                   extra={"sentences": sentences})


# ---------------------------------------------------------------------------------------------
# attacks by name


ATTACKS = ("noise", "finetune", "quantize", "prune")
ATTACK_LABELS = {"noise": "Gaussian noise Ω", "finetune": "fine-tuning Θ (%)", "quantize": "quantization B (bits)",
                 "prune": "magnitude pruning T"}


def severity_order(attack: str, strengths: Iterable[float]) -> list[float]:
    """Strengths from mildest to harshest (fewer bits is harsher)."""
    return sorted(strengths, reverse=attack == "quantize")


def apply_attack(sd: StateDict, attack: str, strength: float, targets: list[str], seed: int) -> dict[str, Tensor]:
    """One of the paper's weight perturbations, through the attack registry of
    ``findlady_core.attacks`` (fine-tuning is done by the caller)."""
    from findlady_core import attack_steps

    if attack not in ("noise", "quantize", "prune") or attack not in attack_steps.REGISTRY:
        raise InputError(f"unknown attack {attack!r}")
    if strength == 0 and attack != "quantize":
        return dict(sd)
    value = int(strength) if attack == "quantize" else float(strength)
    out, _ = attack_steps.REGISTRY[attack].run(dict(sd), {attack: value}, attack_steps.Context(None, seed=seed, targets=targets))
    return out


# ---------------------------------------------------------------------------------------------
# tables, files, plots


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def fmt_ms(values: Sequence[float], digits: int = 2) -> str:
    """``mean ± std`` (std omitted for one value), as the paper prints its tables."""
    m, s = mean_std(values)
    if m != m:
        return "–"
    if len(values) > 1:
        return f"{m:.{digits}f} ± {s:.{digits}f}"
    return f"{m:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def setup_threads(threads: int) -> None:
    """Benchmarks run on shared machines: pin torch's thread count (1 by default)."""
    if threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def out_dir(arg: str | None, quick: bool) -> Path | None:
    """Where files go: ``--out-dir`` when given; else docs/results in full mode, nothing in quick mode."""
    if arg:
        return Path(arg)
    return None if quick else DEFAULT_OUT


def machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
