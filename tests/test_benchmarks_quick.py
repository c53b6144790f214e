"""Every benchmark's ``--quick`` mode runs and its results say what the full run shows.

Benchmarks are not installed and nothing imports them: each runs from the checkout as
``python -m benchmarks NAME --quick`` in a subprocess (the checks of their helper functions
run there too, as ``python -c``). Each quick run writes into a temporary folder; the assertions read its CSV: FindLady puts every
neuron back on an unattacked permuted model, ranking by norm breaks under quantization, the
watermark is scrambled by the permutation and comes back after re-synchronization, scaling is
detected and corrected. The KL formulas of the integrity figure are checked against each other
(eq. 11 is twice eq. 10 at mu = 0; the exact ReLU value is half of it) and against sampling.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # benchmarks/ is a top-level folder beside tests/


def run_benchmarks(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_in_checkout(code: str) -> None:
    """Run ``code`` with the checkout's benchmarks importable; its asserts decide the test."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def quick(name: str, out: Path) -> None:
    r = run_benchmarks(name, "--quick", "--out-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / f"{name}.md").read_text().startswith("# ")
    assert list(out.glob("*.png")), "no plot written"


def test_robustness_quick(tmp_path: Path) -> None:
    quick("robustness", tmp_path)
    rows = read_csv(tmp_path / "robustness.csv")
    assert {r["setting"] for r in rows} == {"paper", "whole"}
    assert {r["attack"] for r in rows} == {"noise", "finetune", "quantize", "prune"}  # common.ATTACKS
    for r in rows:
        if r["attack"] == "noise" and float(r["strength"]) == 0:  # permuted only
            assert float(r["psi_findlady"]) == 100.0
            assert float(r["psi_rank"]) == 100.0  # untouched norms rank the same
            assert float(r["metric"]) == float(r["clean_metric"])
        if r["attack"] == "quantize" and float(r["strength"]) == 2:
            assert float(r["psi_findlady"]) == 100.0
            assert float(r["psi_rank"]) < 90.0  # the paper's Fig. 4: ranking by norm breaks
    assert (tmp_path / "fig4_norm_ranking.png").exists()
    text = (tmp_path / "robustness.md").read_text()
    assert "first strength with Ψ < 100" in text


def test_norm_rank_recovers_a_pure_permutation() -> None:
    run_in_checkout("""
        from benchmarks import common
        from findlady_core.attacks import permute
        from findlady_core.permute import psi

        subject = common.trained_subject("mlp", 0)
        pa = permute(subject.state_dict, subject.spec, None, seed=7)
        found = common.norm_rank(subject.state_dict, pa.state_dict, subject.spec)
        assert psi(subject.spec, pa.truth, found)[1] == 100.0
        assert common.min_norm_gap(subject.state_dict, subject.spec.group(subject.paper_group)) > 0
    """)


def test_watermark_ber_quick(tmp_path: Path) -> None:
    quick("watermark_ber", tmp_path)
    rows = read_csv(tmp_path / "watermark_ber.csv")
    clean = next(r for r in rows if r["attack"] == "noise" and float(r["strength"]) == 0)
    assert float(clean["ber_permuted"]) > 25.0  # the permutation scrambles the key's projection
    assert float(clean["ber_resync_findlady"]) == float(clean["ber_attacked"])  # and re-sync undoes it exactly
    assert clean["detected_resync_findlady"] == "1" and clean["detected_permuted"] == "0"


def test_integrity_scaling_quick(tmp_path: Path) -> None:
    quick("integrity_scaling", tmp_path)
    rows = read_csv(tmp_path / "integrity_scaling.csv")
    for r in rows:
        k = float(r["k"])
        assert float(r["psi_findlady"]) == 100.0  # scaling keeps every cosine at 1
        if k == 0:
            assert r["status"] == "intact" and float(r["false_flags"]) == 0
        if abs(k) >= 0.1:
            assert r["status"] == "modified" and float(r["recall"]) == 1.0
            assert float(r["error_corrected"]) == pytest.approx(float(r["clean_error"]), abs=0.2)
    kl = read_csv(tmp_path / "integrity_kl.csv")
    assert len(kl) >= 3


def test_kl_formulas() -> None:
    run_in_checkout("""
        import numpy as np
        import pytest
        from benchmarks import integrity_scaling

        ks = np.array([-0.5, 0.1, 1.0, 5.0])
        assert np.allclose(integrity_scaling.kl_eq11(ks), 2 * integrity_scaling.kl_eq10(ks))
        assert np.allclose(integrity_scaling.kl_relu_exact(ks), integrity_scaling.kl_eq10(ks) / 2)
        z = np.random.default_rng(0).standard_normal(100_000)
        for k in (0.5, 1.0, 2.0):
            assert integrity_scaling.kl_relu_measured(z, k) == pytest.approx(float(integrity_scaling.kl_relu_exact(k)), rel=0.1)
        # A neuron with a positive mean: the exact value no longer equals the mu = 0 formula.
        shifted = 1.0 + np.random.default_rng(1).standard_normal(100_000)
        assert integrity_scaling.kl_relu_measured(shifted, 1.0) == pytest.approx(
            float(integrity_scaling.kl_relu_exact(1.0, 1.0, 1.0)), rel=0.1)
        assert float(integrity_scaling.kl_relu_exact(1.0, 1.0, 1.0)) > 1.5 * float(integrity_scaling.kl_relu_exact(1.0))
    """)


def test_speed_scaling_quick(tmp_path: Path) -> None:
    quick("speed_scaling", tmp_path)
    rows = read_csv(tmp_path / "speed_scaling.csv")
    assert len(rows) == 2
    for r in rows:
        assert float(r["psi_findlady"]) == 100.0
        assert float(r["s_findlady"]) > 0 and float(r["s_floor"]) > 0
    assert float(rows[0]["model_mb"]) > 0 and float(rows[0]["mb_findlady"]) >= 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resync_speed", "whole_model_noise"])
def test_lead_benchmarks_quick(name: str) -> None:
    r = run_benchmarks(name, "--quick")
    assert r.returncode == 0, r.stderr[-3000:]


def test_dispatcher_names_and_errors() -> None:
    listing = run_benchmarks("--help")
    assert listing.returncode == 0
    for name in ("robustness", "watermark_ber", "integrity_scaling", "speed_scaling"):  # dispatcher.NAMES
        assert name in listing.stdout
    assert run_benchmarks("no-such-benchmark").returncode == 2
    assert run_benchmarks("all", "--out-dir", "x").returncode == 2


def test_scale_quick_runs_the_cli_end_to_end(tmp_path: Path) -> None:
    """``benchmarks.scale --quick`` on the tiny Llama: the CLI's resync puts every neuron back
    and verify recognises the noisy copy; the row records what the table needs."""
    import json

    r = run_benchmarks("scale", "--quick", "--models", "llama-tiny", "--work", str(tmp_path))
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "rows_quick.json").read_text())["llama-tiny"]
    assert row["psi"] == 100.0
    assert row["verdict"] == "match_modified"  # permuted and perturbed by noise 0.1
    assert row["resync_rss"] > row["file_bytes"] and row["floor_tflop"] > 0
    assert set(row["resync_timings"]) == {"load", "resync", "write"}


def test_scale_results_keep_every_earlier_run(tmp_path: Path) -> None:
    """A run's section goes first in the results file; the runs before it stay, in order."""
    from benchmarks.scale import TITLE, record

    out = tmp_path / "scale.md"
    record(out, "## Run A\n\nrow a\n")
    record(out, "## Run B\n\nrow b\n")
    text = out.read_text()
    assert text.startswith(TITLE)
    assert text.index("## Run B") < text.index("## Run A") and "row a" in text and "row b" in text
    out.write_text(TITLE + "\n## Fourth round\n\nhand-written notes\n")
    record(out, "## Run C\n\nrow c\n")
    assert out.read_text() == TITLE + "\n## Run C\n\nrow c\n\n## Fourth round\n\nhand-written notes\n"
