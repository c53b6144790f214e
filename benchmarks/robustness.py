"""Robustness of re-synchronization to the paper's four attacks (Tables 1-4 and 6-9, Fig. 4, 10a-c).

For each model and attack strength: attack the model, measure its task metric, permute it,
re-synchronize it with three methods side by side and report Psi (the percentage of neurons put
back in their place):

* ``findlady``: FindLady's whole-model solver (``findlady_core.resync``);
* ``paper``: the paper's Algorithm 1 (cosine of each layer's own weights, greedy argmax);
* ``rank``: the norm-ranking baseline of the paper's section 3.2 (Fig. 4).

Two settings: ``paper`` (one layer, the penultimate, permuted and attacked; fine-tuning still
trains the whole model) and ``whole`` (every group permuted, every weight tensor attacked).
Trained models run over several seeds (mean ± std as the paper prints); the pretrained ones
(EfficientNet-Lite0, all-MiniLM-L6-v2) are single models, on a coarser grid, without
fine-tuning (their training data is not available here).

    python -m benchmarks robustness [--quick] [--models vgg resnet mlp efficientnet minilm]
        [--seeds 5] [--out-dir docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import ATTACK_LABELS, ATTACKS, METHOD_LABELS, METHODS, Subject

TRAINED = ("vgg", "resnet", "mlp")
PRETRAINED = ("efficientnet", "minilm")
ALL_MODELS = TRAINED + PRETRAINED
SETTINGS = ("paper", "whole")
SETTING_LABELS = {"paper": "paper's setting (penultimate layer permuted and attacked)",
                  "whole": "whole model (every group permuted, every layer attacked)"}

# The paper's grids (Omega 0..10, Theta 2..10 %, B 2..16, T 0.90..0.99) plus a few milder
# strengths, because in the whole-model setting the task collapses long before Omega = 1.
GRID_TRAINED: dict[str, list[float]] = {
    "noise": [0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    "finetune": [2, 4, 6, 8, 10],
    "quantize": [16, 14, 12, 10, 8, 7, 6, 5, 4, 3, 2],
    "prune": [0, 0.5, 0.7, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99],
}
# Pretrained models cost seconds per cell (a forward pass on real inputs, 3 solvers): the paper's
# main-table strengths plus milder ones, where these models lose their task.
GRID_PRETRAINED: dict[str, list[float]] = {
    "noise": [0, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 7, 10],
    "quantize": [16, 12, 10, 8, 7, 6, 5, 4, 3, 2],
    "prune": [0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.91, 0.95, 0.98, 0.99],
}
GRID_QUICK: dict[str, list[float]] = {"noise": [0, 2], "finetune": [2], "quantize": [8, 2], "prune": [0.9]}

PERM_SEED, ATTACK_SEED, FT_SEED = 1000, 2000, 3000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def finetuned(subject: Subject, thetas: Sequence[float], seed: int) -> dict[float, dict[str, Any]]:
    """Fine-tuned copies for each Theta (%), made incrementally: Theta = 4 continues Theta = 2 for
    another 2 % of the original epochs (same total training, a third of the cost)."""
    assert subject.finetune is not None
    out: dict[float, dict[str, Any]] = {}
    prev, state = 0.0, subject.state_dict
    for theta in sorted(thetas):
        state = subject.finetune(dict(state), (theta - prev) / 100.0, seed + int(theta * 10))
        out[theta] = state
        prev = theta
    return out


def run_subject(subject: Subject, grid: dict[str, list[float]], settings: Sequence[str],
                methods: Sequence[str] = METHODS) -> list[dict[str, Any]]:
    """Every (setting, attack, strength) cell of one model, one row each."""
    from findlady_core import attacks

    sd, spec = subject.state_dict, subject.spec
    clean = subject.metric(sd)
    live = common.live_neurons(sd, spec)
    dead = sum(int((~m).sum()) for m in live.values())
    rows: list[dict[str, Any]] = []
    ft: dict[float, dict[str, Any]] = {}
    if "finetune" in grid and subject.finetune is not None:
        t = time.perf_counter()
        ft = finetuned(subject, grid["finetune"], FT_SEED + subject.seed)
        log(f"  {subject.key} s{subject.seed}: fine-tuning {time.perf_counter() - t:.1f}s")
    for setting in settings:
        groups = [subject.paper_group] if setting == "paper" else None
        targets = (attacks.attack_targets(sd, spec, subject.paper_group) if setting == "paper"
                   else attacks.attack_targets(sd))
        clean_cell: dict[str, Any] | None = None
        for attack in ATTACKS:
            if attack not in grid or (attack == "finetune" and not ft):
                continue
            for strength in grid[attack]:
                t0 = time.perf_counter()
                is_clean = (attack in ("noise", "prune") and strength == 0)
                if is_clean and clean_cell is not None:
                    cell = dict(clean_cell)
                else:
                    if attack == "finetune":
                        attacked = ft[strength]
                    else:
                        attacked = common.apply_attack(sd, attack, strength, targets, ATTACK_SEED + subject.seed)
                    value = clean if is_clean else subject.metric(attacked)
                    pa = attacks.permute(attacked, spec, groups, seed=PERM_SEED + subject.seed)
                    res = common.run_methods(sd, pa.state_dict, spec, pa.truth, groups, methods, live)
                    cell = {"metric": value, "retained": subject.metric.retained(value, clean)}
                    for m, (p, s) in res.items():
                        cell[f"psi_{m}"] = p
                        if not m.endswith("_live"):
                            cell[f"s_{m}"] = s
                    if is_clean:
                        clean_cell = dict(cell)
                row = {"model": subject.key, "label": subject.label, "seed": subject.seed, "setting": setting,
                       "attack": attack, "strength": strength, "clean_metric": clean, "dead_neurons": dead, **cell}
                rows.append(row)
                log(f"  {subject.key} s{subject.seed} {setting:5s} {attack:8s} {strength:<5g} metric {cell['metric']:.4g} "
                    + " ".join(f"{m} {cell[f'psi_{m}']:.1f}" for m in methods)
                    + f"  ({time.perf_counter() - t0:.1f}s)")
    return rows


def subjects(models: Sequence[str], seeds: int) -> Any:
    """Yield (subject, grid) for every requested model and seed, loading lazily."""
    for name in models:
        if name in TRAINED:
            for seed in range(seeds):
                yield common.trained_subject(name, seed)
        elif name == "efficientnet":
            yield common.efficientnet_subject()
        elif name == "minilm":
            yield common.minilm_subject()
        else:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(ALL_MODELS)}")


# ---------------------------------------------------------------------------------------------
# aggregation and output


Key = tuple[str, str, str, float]  # model, setting, attack, strength


def aggregate(rows: list[dict[str, Any]]) -> dict[Key, dict[str, list[float]]]:
    agg: dict[Key, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        a = agg[(r["model"], r["setting"], r["attack"], r["strength"])]
        for k in ("metric", "retained", *[f"psi_{m}" for m in METHODS], *[f"psi_{m}_live" for m in METHODS],
                  *[f"s_{m}" for m in METHODS]):
            if k in r:
                a[k].append(r[k])
    return agg


def first_drops(rows: list[dict[str, Any]], setting: str) -> list[dict[str, Any]]:
    """Per model, attack and method: the mildest strength where mean Psi < 100, the task metric
    there, and whether Psi = 100 held at every strength keeping >= 95 % of the clean metric."""
    agg = aggregate(rows)
    out = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        for attack in ATTACKS:
            strengths = common.severity_order(attack, {k[3] for k in agg if k[0] == model and k[1] == setting and k[2] == attack})
            if not strengths:
                continue
            for method in METHODS:
                first = None
                violations = []
                for s in strengths:
                    a = agg[(model, setting, attack, s)]
                    if f"psi_{method}" not in a:
                        continue
                    p, _ = common.mean_std(a[f"psi_{method}"])
                    ret, _ = common.mean_std(a["retained"])
                    if p < 100 and first is None:
                        first = (s, p, common.mean_std(a["metric"])[0], ret)
                    if p < 100 and ret >= 0.95:
                        violations.append(s)
                out.append({"model": model, "attack": attack, "method": method, "first": first,
                            "violations": violations, "target_met": not violations})
    return out


def live_markdown(rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    """Cells where FindLady's Psi < 100 while the model keeps >= 95 % of its clean metric, with Psi
    over live neurons only: tells dead-channel swaps apart from real mistakes."""
    agg = aggregate(rows)
    dead = {r["model"]: r["dead_neurons"] for r in rows}
    body = []
    for (model, setting, attack, s), a in sorted(agg.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        p, _ = common.mean_std(a["psi_findlady"])
        ret, _ = common.mean_std(a["retained"])
        if p < 100 and ret >= 0.95 and "psi_findlady_live" in a:
            body.append([labels[model], setting, ATTACK_LABELS[attack], f"{s:g}", f"{100 * ret:.1f} %", f"{p:.2f}",
                         common.fmt_ms(a["psi_findlady_live"]), dead[model]])
    if not body:
        return "FindLady's Ψ is 100 in every cell where the model keeps ≥ 95 % of its clean task metric.\n"
    return common.markdown_table(
        ["model", "setting", "attack", "strength", "metric kept", "Ψ FindLady", "Ψ FindLady, live neurons only",
         "dead neurons in the model"], body)


def _num(v: float) -> str:
    return f"{v:g}"


def tables_markdown(rows: list[dict[str, Any]], labels: dict[str, str], metrics: dict[str, str]) -> str:
    agg = aggregate(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    seeds = {m: len({r["seed"] for r in rows if r["model"] == m}) for m in models}
    out = []
    for setting in SETTINGS:
        if not any(k[1] == setting for k in agg):
            continue
        out.append(f"### {SETTING_LABELS[setting].capitalize()}\n")
        for attack in ATTACKS:
            strengths = common.severity_order(attack, {k[3] for k in agg if k[1] == setting and k[2] == attack})
            if not strengths:
                continue
            out.append(f"**{ATTACK_LABELS[attack]}** — {setting} setting\n")
            headers = [ATTACK_LABELS[attack].split()[-1] if attack != "finetune" else "Θ %", "row"] + [
                f"{labels[m]} ({seeds[m]} seed{'s' if seeds[m] > 1 else ''})" for m in models]
            body = []
            for s in strengths:
                for q in (*[f"psi_{m}" for m in METHODS], "metric"):
                    cells = []
                    for m in models:
                        a = agg.get((m, setting, attack, s))
                        if not a or q not in a:
                            cells.append("–")
                        else:
                            digits = 2 if q.startswith("psi") else (4 if m == "minilm" else 2)
                            cells.append(common.fmt_ms(a[q], digits))
                    name = f"Ψ {METHOD_LABELS[q[4:]]} (↑)" if q.startswith("psi") else "task metric"
                    body.append([_num(s) if q == "psi_findlady" else "", name, *cells])
            out.append(common.markdown_table(headers, body))
        out.append("")
    legend = "; ".join(f"{labels[m]}: {metrics[m]}" for m in models)
    return f"Task metric per model — {legend}.\n\n" + "\n".join(out)


def drops_markdown(rows: list[dict[str, Any]], setting: str, labels: dict[str, str], metrics: dict[str, str]) -> str:
    body = []
    for d in first_drops(rows, setting):
        if d["first"] is None:
            first, there = "never (Ψ = 100 at every strength)", "–"
        else:
            s, p, v, ret = d["first"]
            first = f"{_num(s)} (Ψ {p:.2f})"
            there = f"{v:.4g} ({100 * ret:.1f} % of clean)"
        target = "yes" if d["target_met"] else "**no** (Ψ < 100 at " + ", ".join(_num(s) for s in d["violations"]) + ")"
        body.append([labels[d["model"]], ATTACK_LABELS[d["attack"]], METHOD_LABELS[d["method"]], first, there, target])
    return common.markdown_table(
        ["model", "attack", "method", "first strength with Ψ < 100", "task metric there", "Ψ = 100 wherever ≥ 95 % of clean metric kept?"],
        body)


def plot(rows: list[dict[str, Any]], out: Path, labels: dict[str, str], metrics: dict[str, str]) -> list[Path]:
    """One figure per (setting, attack), one panel per model: Psi of each method on the left
    axis, the task metric on the right (as the paper's Fig. 10)."""
    plt = common.pyplot()
    agg = aggregate(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {"findlady": "tab:blue", "paper": "tab:cyan", "rank": "tab:purple"}
    paths = []
    for setting in SETTINGS:
        for attack in ATTACKS:
            panels = [m for m in models if any(k[:3] == (m, setting, attack) for k in agg)]
            if not panels:
                continue
            fig, axes = plt.subplots(1, len(panels), figsize=(max(3.6 * len(panels), 7.0), 3.4), squeeze=False)
            for ax, m in zip(axes[0], panels):
                xs = common.severity_order(attack, {k[3] for k in agg if k[:3] == (m, setting, attack)})
                pos = list(range(len(xs)))  # evenly spaced, mildest first: the grids are uneven
                for method in METHODS:
                    ys = [common.mean_std(agg[(m, setting, attack, x)][f"psi_{method}"])[0] for x in xs]
                    ax.plot(pos, ys, "o-", ms=3, color=colors[method], label=f"Ψ {METHOD_LABELS[method]}")
                ax.set_ylim(-3, 103)
                ax.set_ylabel("Ψ (%)", color="tab:blue")
                ax.set_xlabel(ATTACK_LABELS[attack])
                ax.set_xticks(pos, [f"{x:g}" for x in xs], fontsize=7, rotation=60)
                ax.set_title(labels[m], fontsize=9)
                ax2 = ax.twinx()
                ys = [common.mean_std(agg[(m, setting, attack, x)]["metric"])[0] for x in xs]
                ax2.plot(pos, ys, "s--", ms=3, color="tab:red", label=metrics[m])
                ax2.set_ylabel(metrics[m], color="tab:red", fontsize=8)
            h1, l1 = axes[0][0].get_legend_handles_labels()
            fig.legend(h1, l1, loc="lower center", ncol=3, fontsize=8)
            fig.suptitle(f"{ATTACK_LABELS[attack]} — {SETTING_LABELS[setting]}", fontsize=10)
            fig.tight_layout(rect=(0, 0.08, 1, 0.95))
            p = out / f"robustness_{setting}_{attack}.png"
            fig.savefig(p, dpi=90)
            plt.close(fig)
            paths.append(p)
    return paths


def plot_fig4(subject: Subject, rows: list[dict[str, Any]], out: Path) -> Path:
    """Fig. 4: (a) l1 norms of the penultimate layer's neurons, (b) norm ranking vs quantization."""
    plt = common.pyplot()
    g = subject.spec.group(subject.paper_group)
    norms = common.l1_norms(subject.state_dict, g).numpy()
    gap = common.min_norm_gap(subject.state_dict, g)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.3))
    a.hist(norms, bins=30, color="tab:blue")
    a.set_xlabel("l1 norm of a neuron's weights")
    a.set_ylabel("neurons")
    a.set_title(f"(a) {subject.label}, {g.name}: {g.size} neurons\nsmallest gap between two norms {gap:.2g}", fontsize=9)
    agg = aggregate([r for r in rows if r["model"] == subject.key and r["setting"] == "paper" and r["attack"] == "quantize"])
    xs = sorted({k[3] for k in agg})
    if xs:
        for method, color in (("rank", "tab:purple"), ("findlady", "tab:blue")):
            b.plot(xs, [common.mean_std(agg[(subject.key, "paper", "quantize", x)][f"psi_{method}"])[0] for x in xs],
                   "o-", color=color, ms=3, label=f"Ψ {METHOD_LABELS[method]}")
        b.set_ylim(-3, 103)
        b.invert_xaxis()
        b.set_xlabel("quantization B (bits)")
        b.set_ylabel("Ψ (%)")
        b2 = b.twinx()
        b2.plot(xs, [common.mean_std(agg[(subject.key, "paper", "quantize", x)]["metric"])[0] for x in xs],
                "s--", color="tab:red", ms=3, label="err %")
        b2.set_ylabel("err %", color="tab:red")
        b.legend(fontsize=8, loc="center left")
        b.set_title("(b) ranking by norm vs. quantization (paper's setting)", fontsize=9)
    fig.tight_layout()
    p = out / "fig4_norm_ranking.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


# ---------------------------------------------------------------------------------------------
# the paper's published numbers (Tables 1-4, with Table 7's Theta = 4): (Psi, metric) per strength


PAPER: dict[str, dict[str, dict[float, tuple[str, str]]]] = {
    # model -> attack -> strength -> (Psi, task metric); error % (top-1) for all four
    "VGG16": {
        "noise": {0: ("100 ± 0", "9.96 ± 0.19"), 1: ("100 ± 0", "10.25 ± 0.17"), 2: ("100 ± 0", "11.82 ± 0.17"),
                  7: ("99.88 ± 0.12", "41.27 ± 2.11"), 10: ("93.50 ± 0.98", "56.62 ± 2.31")},
        "finetune": {2: ("100 ± 0", "9.97 ± 0.20"), 4: ("100 ± 0", "9.93 ± 0.24"), 6: ("100 ± 0", "9.96 ± 0.19"),
                     8: ("100 ± 0", "9.88 ± 0.24"), 10: ("100 ± 0", "9.89 ± 0.16")},
        "quantize": {16: ("100 ± 0", "9.96 ± 0.19"), 8: ("100 ± 0", "9.97 ± 0.20"), 6: ("100 ± 0", "9.98 ± 0.17"),
                     4: ("100 ± 0", "10.77 ± 0.28"), 2: ("100 ± 0", "87.73 ± 5.56")},
        "prune": {0: ("100 ± 0", "9.96 ± 0.19"), 0.91: ("100 ± 0", "10.87 ± 0.22"), 0.95: ("100 ± 0", "12.11 ± 0.45"),
                  0.98: ("100 ± 0", "17.53 ± 1.28"), 0.99: ("99.90 ± 0.13", "26.71 ± 2.84")},
    },
    "ResNet18": {
        "noise": {0: ("100 ± 0", "7.03 ± 0.28"), 1: ("100 ± 0", "7.30 ± 0.08"), 2: ("100 ± 0", "9.13 ± 0.59"),
                  7: ("99.90 ± 0.10", "99.55 ± 6.30"), 10: ("94.9 ± 0.80", "75.18 ± 5.14")},
        "finetune": {2: ("100 ± 0", "6.96 ± 0.11"), 4: ("100 ± 0", "8.12 ± 0.34"), 6: ("100 ± 0", "6.98 ± 0.15"),
                     8: ("100 ± 0", "7.01 ± 0.19"), 10: ("100 ± 0", "6.94 ± 0.13")},
        "quantize": {16: ("100 ± 0", "7.03 ± 0.28"), 8: ("100 ± 0", "7.05 ± 0.27"), 6: ("100 ± 0", "7.14 ± 0.27"),
                     4: ("100 ± 0", "7.76 ± 0.26"), 2: ("100 ± 0", "88.20 ± 2.77")},
        "prune": {0: ("100 ± 0", "7.03 ± 0.28"), 0.91: ("100 ± 0", "9.67 ± 0.95"), 0.95: ("100 ± 0", "12.88 ± 1.90"),
                  0.98: ("100 ± 0", "21.71 ± 5.39"), 0.99: ("99.63 ± 0.31", "28.16 ± 7.35")},
    },
    "MobileNetV3": {
        "noise": {0: ("100", "25.95"), 1: ("100", "40.44"), 2: ("100", "70.50"), 7: ("85.31", "98.91"), 10: ("43.05", "99.41")},
        "finetune": {2: ("100", "26.60"), 4: ("100", "26.51"), 6: ("100", "26.41"), 8: ("100", "26.37"), 10: ("100", "26.31")},
        "quantize": {16: ("100", "25.96"), 8: ("100", "26.00"), 6: ("100", "42.91"), 4: ("100", "99.91"), 2: ("100", "99.9")},
        "prune": {0: ("100", "25.95"), 0.91: ("100", "40.00"), 0.95: ("100", "48.73"), 0.98: ("97.91", "63.48"),
                  0.99: ("86.46", "76.22")},
    },
    "ViT-b-32": {
        "noise": {0: ("100", "24.07"), 1: ("100", "24.08"), 2: ("99.64", "24.77"), 7: ("99.64", "60.39"), 10: ("99.22", "83.99")},
        "finetune": {2: ("100", "24.08"), 4: ("100", "24.08"), 6: ("100", "24.08"), 8: ("100", "24.07"), 10: ("100", "24.07")},
        "quantize": {16: ("100", "24.08"), 8: ("100", "24.10"), 6: ("100", "29.55"), 4: ("100", "96.81"), 2: ("100", "99.81")},
        "prune": {0: ("100", "24.07"), 0.91: ("100", "25.06"), 0.95: ("100", "25.60"), 0.98: ("99.83", "26.03"),
                  0.99: ("95.37", "26.63")},
    },
}
# Our model set against the closest published one (same family or the same kind of data).
PAIRS = (("vgg", "VGG16"), ("resnet", "ResNet18"), ("efficientnet", "MobileNetV3"), ("minilm", "ViT-b-32"))


def paper_comparison(rows: list[dict[str, Any]], labels: dict[str, str], metrics: dict[str, str]) -> str:
    """The paper's main-table strengths, its numbers next to ours (paper's setting), per attack."""
    agg = aggregate(rows)
    out = []
    for attack in ATTACKS:
        body = []
        for ours, theirs in PAIRS:
            if ours not in labels:
                continue
            for s in common.severity_order(attack, PAPER[theirs][attack]):
                a = agg.get((ours, "paper", attack, s))
                p_psi, p_metric = PAPER[theirs][attack][s]
                if a:
                    cells = [common.fmt_ms(a[f"psi_{m}"]) for m in METHODS]
                    digits = 4 if ours == "minilm" else 2
                    cells.append(common.fmt_ms(a["metric"], digits))
                else:
                    cells = ["–"] * (len(METHODS) + 1)
                body.append([f"{theirs} → {labels[ours]}", f"{s:g}", p_psi, p_metric, *cells])
        if body:
            out.append(f"**{ATTACK_LABELS[attack]}**\n")
            out.append(common.markdown_table(
                ["paper's model → ours", "strength", "paper Ψ", "paper err %",
                 *[f"our Ψ {METHOD_LABELS[m]}" for m in METHODS], "our task metric"], body))
    legend = "; ".join(f"{labels[m]}: {metrics[m]}" for m, _ in PAIRS if m in labels)
    return ("Paper's setting (penultimate layer permuted and attacked). Paper: CIFAR-10 models over 10 seeds, "
            "ImageNet models single runs, error % (↓). Ours: " + legend + ".\n\n" + "\n".join(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks robustness", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MLP only, one seed, two strengths per attack (CI smoke run)")
    ap.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None)
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the trained models (default 5)")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--out-dir", default=None, help="default docs/results (full mode); quick mode writes only when given")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    common.setup_threads(args.threads)
    models = args.models or (["mlp"] if args.quick else list(ALL_MODELS))
    seeds = 1 if args.quick else args.seeds
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    metrics: dict[str, str] = {}
    timing: dict[str, float] = defaultdict(float)
    fig4_subject = None
    for subject in subjects(models, seeds):
        t = time.perf_counter()
        grid = GRID_QUICK if args.quick else (GRID_TRAINED if subject.key in TRAINED else GRID_PRETRAINED)
        labels[subject.key] = subject.label
        metrics[subject.key] = f"{subject.metric.name}{' ' + subject.metric.unit if subject.metric.unit else ''} ({subject.metric.arrow})"
        rows += run_subject(subject, grid, args.settings)
        timing[subject.key] += time.perf_counter() - t
        if subject.key == "vgg" and subject.seed == 0:
            fig4_subject = subject
        log(f"{subject.key} seed {subject.seed}: {time.perf_counter() - t:.1f}s")
    total = time.perf_counter() - start
    md = tables_markdown(rows, labels, metrics)
    drops = {s: drops_markdown(rows, s, labels, metrics) for s in args.settings}
    print(md)
    for s, d in drops.items():
        print(f"First Ψ < 100, {s} setting\n{d}")
    out = common.out_dir(args.out_dir, args.quick)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        common.write_csv(out / "robustness.csv", rows)
        plots = plot(rows, out, labels, metrics)
        if fig4_subject is None and rows:
            fig4_subject = next(subjects([rows[0]["model"]], 1)) if rows[0]["model"] in TRAINED else None
        if fig4_subject is not None:
            plots.append(plot_fig4(fig4_subject, rows, out))
        cmd = "python -m benchmarks robustness" + (" --quick" if args.quick else "") + (
            f" --models {' '.join(models)}" if args.models else "") + (f" --seeds {args.seeds}" if args.seeds != 5 else "")
        text = [
            "# Robustness of re-synchronization (paper Tables 1-4 / 6-9, Fig. 4, 10a-c)\n",
            f"Command: `{cmd}` — {common.machine()}; {total / 60:.1f} min "
            f"({', '.join(f'{labels[k]} {v:.0f}s' for k, v in timing.items())}).\n",
            "Ψ: percentage of permuted neurons put back in place (mean ± std over seeds). Attacks are applied "
            "to the model, its task metric is measured, then it is permuted (seeded) and re-synchronized by "
            "each method. Fine-tuning trains the whole model in both settings.\n",
            "## Where Ψ first drops below 100\n",
            *[f"### {SETTING_LABELS[s].capitalize()}\n\n{drops[s]}" for s in args.settings],
            "### FindLady below 100 where the model still works: dead neurons?\n",
            f"Dead neurons: own weights' l2 norm below {common.DEAD_RELATIVE_NORM:g} × their group's median.\n",
            live_markdown(rows, labels),
            "## Tables\n",
            md,
            "## Plots\n",
            *[f"![{p.stem}]({p.name})\n" for p in plots],
        ]
        (out / "robustness.md").write_text("\n".join(text))
        (out / "robustness_vs_paper.md").write_text(
            "# Our robustness numbers next to the paper's Tables 1-4\n\n" f"Command: `{cmd}`.\n\n"
            + paper_comparison(rows, labels, metrics))
        log(f"wrote {out / 'robustness.md'}, robustness.csv and {len(plots)} plots")
    log(f"robustness: {total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
