"""The integrity attack w -> (1 + k) w (paper section 3.4, eq. 10-11, Fig. 10d).

Scaling a neuron's own weights keeps every cosine similarity at 1, so re-synchronization still
finds it (Psi stays 100) while the model's behaviour changes. For the penultimate layer of the
VGG-style CNN (5 seeds), a random 10 % of the neurons, or all of them, are scaled by (1 + k);
then every group is permuted and the suspect is re-synchronized. Reported per k:

* the task error of the scaled model, and after ``integrity.correct_norms`` puts the flagged
  neurons' norms back (the paper's "detected and corrected");
* detection: whether ``integrity.check_integrity`` says ``modified``, the share of scaled
  neurons it flags and how many untouched neurons it flags;
* Psi of the three methods (norm ranking fails: scaling moves exactly the norms it ranks).

Second part, the KL divergence between a ReLU neuron's output before and after scaling. The
paper's eq. (11) (ReLU, mu_z = 0) is twice its eq. (10) at mu_z = 0, although eq. (10), the
pre-activation divergence, is said to upper-bound it. The exact value for a ReLU with
z ~ N(0, sigma^2) is half of eq. (10): below z = 0 both outputs are 0 (same point mass), above
it the integral covers half of the Gaussian. We plot eq. (10), eq. (11), that exact value, the
exact value for a Gaussian with each real neuron's own mu and sigma, and a measurement on the
real pre-activations (a kernel density estimate on log y, where scaling is a shift).

    python -m benchmarks integrity_scaling [--quick] [--seeds 5] [--out-dir docs/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from benchmarks import common
from benchmarks.common import METHOD_LABELS, METHODS

K_GRID = [-0.9, -0.5, -0.2, -0.1, -0.05, -0.02, -0.01, -0.005, 0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
          5.0, 10.0]
K_QUICK = [-0.5, 0.0, 0.005, 0.1, 2.0]
FRACTIONS = (0.1, 1.0)
KL_K = [-0.5, -0.25, -0.1, -0.05, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0]
PERM_SEED, PICK_SEED = 1000, 4000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# KL divergences


def kl_eq10(k: np.ndarray | float, mu: float = 0.0, sigma: float = 1.0) -> np.ndarray:
    """The paper's eq. (10): KL between the pre-activations N(mu, s^2) and N((1+k) mu, (1+k)^2 s^2)."""
    k = np.asarray(k, dtype=float)
    return np.log1p(k) + (sigma**2 + k**2 * mu**2) / (2 * (1 + k) ** 2 * sigma**2) - 0.5


def kl_eq11(k: np.ndarray | float) -> np.ndarray:
    """The paper's eq. (11) for ReLU at mu = 0 (equals 2 x eq. (10) at mu = 0)."""
    k = np.asarray(k, dtype=float)
    return (2 * (k + 1) ** 2 * np.log1p(k) - k * (k + 2)) / (k + 1) ** 2


def kl_relu_exact(k: np.ndarray | float, mu: float = 0.0, sigma: float = 1.0) -> np.ndarray:
    """Exact KL(relu(z) || relu((1+k) z)) for z ~ N(mu, sigma^2), k > -1.

    Both outputs put the same mass P(z <= 0) at 0, which contributes nothing; above 0,
    ``log p(x) - log q(x) = log c + ((x/c - mu)^2 - (x - mu)^2) / (2 sigma^2)`` with c = 1 + k,
    integrated against the Gaussian's truncated moments. At mu = 0 this is eq. (10) / 2.
    """
    c = 1.0 + np.asarray(k, dtype=float)
    a = -mu / sigma
    m0 = norm.sf(a)
    m1 = mu * m0 + sigma * norm.pdf(a)
    m2 = (mu**2 + sigma**2) * m0 + mu * sigma * norm.pdf(a)
    return m0 * np.log(c) + ((1 / c**2 - 1) * m2 - 2 * mu * (1 / c - 1) * m1) / (2 * sigma**2)


def kl_relu_measured(z: np.ndarray, k: float) -> float:
    """KL(relu(z) || relu((1+k) z)) estimated from samples ``z`` of a pre-activation.

    The zero outputs match exactly; on z > 0, KL is invariant under x -> log x, where scaling
    becomes a shift by log(1 + k): KL = P(z > 0) E[log f(u) - log f(u - log(1 + k))] with f the
    density of u = log z, estimated by a Gaussian kernel on a fine grid. Accurate for k > 0; for
    k < 0 the divergence is carried by rare tail samples and the estimate is biased low.
    """
    z = np.asarray(z, dtype=float)
    pos = z[z > 0]
    if pos.size < 20:
        return 0.0
    u = np.log(pos)
    shift = float(np.log1p(k))
    bw = 1.06 * float(u.std()) * pos.size ** -0.2
    step = bw / 4
    edges = np.arange(u.min() - abs(shift) - 8 * bw, u.max() + abs(shift) + 8 * bw + step, step)
    hist, _ = np.histogram(u, bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    t = np.arange(-24, 25) * step
    kernel = np.exp(-0.5 * (t / bw) ** 2)
    density = np.convolve(hist, kernel / kernel.sum(), mode="same") / (pos.size * step)
    logf = np.log(np.maximum(density, 1e-300))
    return float(np.mean(np.interp(u, centres, logf) - np.interp(u - shift, centres, logf))) * pos.size / z.size


def preactivations(subject: common.Subject, name: str) -> np.ndarray:
    """(samples, neurons) pre-activations of the penultimate layer on the training and test sets."""
    from findlady_examples import data, models, train

    model = subject.extra["model"]
    module = dict(model.named_modules())[models.info(name).penultimate]
    got: list[torch.Tensor] = []
    h = module.register_forward_hook(lambda _m, _i, o: got.append(o.detach()))
    try:
        tr, te = data.load(models.info(name).dataset, train.config(name).data_seed)
        model.load_state_dict(subject.state_dict)
        with torch.inference_mode():
            for ds in (tr, te):
                x = ds.tensors[0]
                for i in range(0, len(x), 500):
                    model(x[i:i + 500])
    finally:
        h.remove()
    z = torch.cat(got)
    return z.reshape(z.shape[0], z.shape[1], -1).transpose(1, 2).reshape(-1, z.shape[1]).numpy()


def kl_rows(z: np.ndarray, ks: list[float], mc_samples: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    g = rng.standard_normal(mc_samples)
    mus, sds = z.mean(0), z.std(0)
    alive = sds > 0
    rows = []
    for k in ks:
        measured = [kl_relu_measured(z[:, j], k) for j in range(z.shape[1]) if alive[j]]
        fitted = [float(kl_relu_exact(k, float(mus[j]), float(sds[j]))) for j in range(z.shape[1]) if alive[j]]
        rows.append({
            "k": k,
            "eq10_mu0": float(kl_eq10(k)),
            "eq11_paper": float(kl_eq11(k)),
            "exact_relu_mu0": float(kl_relu_exact(k)),
            "monte_carlo_mu0": kl_relu_measured(g, k),
            "real_measured_median": float(np.median(measured)),
            "real_gaussian_fit_median": float(np.median(fitted)),
            "neurons": int(alive.sum()),
        })
    return rows


# ---------------------------------------------------------------------------------------------
# the scaling sweep


def sweep(subject: common.Subject, ks: list[float], fractions: tuple[float, ...]) -> list[dict[str, Any]]:
    from findlady_core import attacks
    from findlady_core.integrity import check_integrity, correct_norms
    from findlady_core.resync import resync

    sd, spec, gname = subject.state_dict, subject.spec, subject.paper_group
    g = spec.group(gname)
    clean = subject.metric(sd)
    rows = []
    for frac in fractions:
        n = max(1, round(frac * g.size))
        gen = torch.Generator().manual_seed(PICK_SEED + subject.seed)
        neurons = sorted(torch.randperm(g.size, generator=gen)[:n].tolist())
        scaled_set = set(neurons)
        for k in ks:
            state = sd if k == 0 else attacks.scale_neurons(sd, spec, gname, neurons, k)
            err = subject.metric(state)
            pa = attacks.permute(state, spec, None, seed=PERM_SEED + subject.seed)
            res = common.run_methods(sd, pa.state_dict, spec, pa.truth, None)
            r = resync(sd, pa.state_dict, spec, device="cpu")
            integ = check_integrity(sd, r.state_dict, spec)
            flagged = {(f["group"], f["neuron"]) for f in integ.flagged}
            hit = sum(1 for i in neurons if (gname, i) in flagged)
            false = sum(1 for f in flagged if f[0] != gname or f[1] not in scaled_set)
            corrected = correct_norms(sd, r.state_dict, spec, integ.flagged) if integ.flagged else r.state_dict
            rows.append({
                "model": subject.key, "seed": subject.seed, "fraction": frac, "scaled": n if k else 0, "k": k,
                "error": err, "clean_error": clean, "error_corrected": subject.metric(corrected),
                "status": integ.status, "detected": int(integ.status == "modified"),
                "recall": (hit / n) if k else float("nan"), "false_flags": false,
                "max_abs_log_norm_ratio": integ.max_abs_log_norm_ratio,
                **{f"psi_{m}": res[m][0] for m in METHODS},
            })
    return rows


def sweep_table(rows: list[dict[str, Any]]) -> str:
    agg: dict[tuple[float, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        a = agg[(r["fraction"], r["k"])]
        for key in ("error", "error_corrected", "detected", "recall", "false_flags", *[f"psi_{m}" for m in METHODS]):
            a[key].append(r[key])
    body = []
    for (frac, k), a in sorted(agg.items()):
        det = f"{int(sum(a['detected']))}/{len(a['detected'])}"
        body.append([f"{100 * frac:g} %", f"{k:g}", common.fmt_ms(a["error"]), det,
                     "–" if k == 0 else common.fmt_ms([100 * v for v in a["recall"]], 1),
                     common.fmt_ms(a["false_flags"], 1), common.fmt_ms(a["error_corrected"]),
                     *[common.fmt_ms(a[f"psi_{m}"], 1) for m in METHODS]])
    return common.markdown_table(
        ["neurons scaled", "k", "err % (↓)", "flagged `modified`", "scaled neurons flagged %", "untouched neurons flagged",
         "err % after correct_norms", *[f"Ψ {METHOD_LABELS[m]}" for m in METHODS]], body)


def kl_table(rows: list[dict[str, Any]]) -> str:
    cols = ["eq10_mu0", "eq11_paper", "exact_relu_mu0", "monte_carlo_mu0", "real_gaussian_fit_median", "real_measured_median"]
    heads = ["eq. (10), μ=0", "eq. (11) (paper)", "exact ReLU, μ=0 (= eq. 10 / 2)", "measured on N(0,1) samples",
             "exact ReLU, real neurons' μ, σ (median)", "measured, real neurons (median)"]
    return common.markdown_table(["k", *heads], [[f"{r['k']:g}", *[f"{r[c]:.4f}" for c in cols]] for r in rows])


def plot_sweep(rows: list[dict[str, Any]], path: Any) -> None:
    plt = common.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for frac, ls in zip(FRACTIONS, ("-", "--")):
        sel = [r for r in rows if r["fraction"] == frac]
        ks = sorted({r["k"] for r in sel})
        if not ks:
            continue

        def m(key: str, k: float) -> float:
            return common.mean_std([r[key] for r in sel if r["k"] == k])[0]

        a.plot(ks, [m("error", k) for k in ks], "s", ls=ls, color="tab:red", ms=3, label=f"err %, {100 * frac:g} % scaled")
        a.plot(ks, [m("error_corrected", k) for k in ks], "x", ls=ls, color="tab:green", ms=4,
               label=f"err % after correction, {100 * frac:g} %")
        b.plot(ks, [100 * m("detected", k) for k in ks], "o", ls=ls, color="tab:orange", ms=3,
               label=f"runs flagged modified (%), {100 * frac:g} %")
        b.plot(ks, [m("psi_findlady", k) for k in ks], "^", ls=ls, color="tab:blue", ms=3, label=f"Ψ FindLady, {100 * frac:g} %")
        b.plot(ks, [m("psi_rank", k) for k in ks], "v", ls=ls, color="tab:purple", ms=3, label=f"Ψ norm ranking, {100 * frac:g} %")
    for ax in (a, b):
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("scaling k (w → (1 + k) w)")
        ax.legend(fontsize=7)
    a.set_ylabel("err %")
    a.set_title("(a) task error vs. k", fontsize=9)
    b.set_ylabel("%")
    b.set_ylim(-3, 103)
    b.set_title("(b) detection and Ψ vs. k", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_kl(rows: list[dict[str, Any]], path: Any) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ks = [r["k"] for r in rows]
    dense = np.linspace(min(ks), max(ks), 400)
    ax.plot(dense, kl_eq10(dense), color="grey", label="eq. (10), μ=0 (pre-activation)")
    ax.plot(dense, kl_eq11(dense), color="tab:red", ls="--", label="eq. (11), paper (= 2 × eq. 10)")
    ax.plot(dense, kl_relu_exact(dense), color="tab:blue", label="exact ReLU, μ=0 (= eq. 10 / 2)")
    ax.plot(ks, [r["monte_carlo_mu0"] for r in rows], "o", color="tab:blue", ms=4, label="measured, N(0,1) samples")
    ax.plot(ks, [r["real_gaussian_fit_median"] for r in rows], "^", color="tab:green", ms=4,
            label="exact ReLU, real neurons' μ, σ (median)")
    ax.plot(ks, [r["real_measured_median"] for r in rows], "s", color="tab:orange", ms=4, label="measured, real neurons (median)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_yscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("KL(y || ỹ)")
    ax.legend(fontsize=7)
    ax.set_title("KL divergence of a ReLU neuron's output under w → (1 + k) w", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks integrity_scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MLP, one seed, five values of k")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    common.setup_threads(args.threads)
    start = time.perf_counter()
    name = "mlp" if args.quick else "vgg"
    seeds = 1 if args.quick else args.seeds
    rows: list[dict[str, Any]] = []
    first = None
    for seed in range(seeds):
        t = time.perf_counter()
        subject = common.trained_subject(name, seed)
        first = first or subject
        rows += sweep(subject, K_QUICK if args.quick else K_GRID, FRACTIONS)
        log(f"integrity_scaling {name} seed {seed}: {time.perf_counter() - t:.1f}s")
    assert first is not None
    z = preactivations(first, name)
    krows = kl_rows(z, KL_K[::3] if args.quick else KL_K, 20_000 if args.quick else 200_000)
    total = time.perf_counter() - start
    st, kt = sweep_table(rows), kl_table(krows)
    print(st)
    print(kt)
    out = common.out_dir(args.out_dir, args.quick)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        common.write_csv(out / "integrity_scaling.csv", rows)
        common.write_csv(out / "integrity_kl.csv", krows)
        plot_sweep(rows, out / "integrity_scaling.png")
        plot_kl(krows, out / "integrity_kl.png")
        cmd = "python -m benchmarks integrity_scaling" + (" --quick" if args.quick else "") + (
            f" --seeds {args.seeds}" if args.seeds != 5 else "")
        (out / "integrity_scaling.md").write_text(
            "# Integrity attack w → (1 + k) w (paper section 3.4, Fig. 10d, eq. 10-11)\n\n"
            f"Command: `{cmd}` — {common.machine()}; {total:.0f}s.\n\n"
            f"{first.label}, group `{first.paper_group}` ({first.spec.group(first.paper_group).size} neurons), "
            f"{seeds} seed(s), mean ± std. A random 10 % of the layer's neurons, or all of them, scaled by (1 + k); "
            "every group then permuted and re-synchronized; `check_integrity` at its default tolerance (1 % on the norm).\n\n"
            + st + "\n![integrity scaling](integrity_scaling.png)\n\n"
            f"## KL divergence (ReLU)\n\nReal neurons: `{first.paper_group}` pre-activations of seed 0 over the "
            f"{z.shape[0]} training and test images ({krows[0]['neurons']} neurons with non-constant output).\n\n"
            + kt + "\n![KL](integrity_kl.png)\n")
        log(f"wrote {out / 'integrity_scaling.md'}")
    log(f"integrity_scaling: {total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
