"""The ``findlady`` core CLI, run in-process through ``main(argv)`` (plus one subprocess ``--help``)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from findlady_cli.main import main
from findlady_cli.truth import TRUTH_FORMAT
from findlady_core.io import load_state_dict, save_state_dict
from findlady_core.permute import apply_permutations
from findlady_core.spec import Spec
from findlady_examples.models import MLP

HAS_REPORT = importlib.util.find_spec("findlady_core.report") is not None
needs_report = pytest.mark.skipif(not HAS_REPORT, reason="report.verify not available yet")

SIZES = (8, 48, 32, 4)  # two hidden groups: layers.0 (48) and layers.2 (32)


def _mlp_sd(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in MLP(SIZES).state_dict().items()}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    """A reference MLP and its spec, inferred through the CLI."""
    # torch.save keeps the module's tensor order, which the plain-chain guess reads
    ref = tmp_path / "ref.pt"
    save_state_dict(_mlp_sd(0), ref)
    spec = tmp_path / "spec.json"
    code, _, err = run(["spec", "infer", "--weights", ref, "-o", spec], capsys)
    assert code == 0, err
    return {"ref": ref, "spec": spec, "dir": tmp_path}


# ---------------------------------------------------------------- spec infer


def test_spec_infer_weights_gives_a_valid_chain_spec_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = _mlp_sd(0)
    ref = tmp_path / "ref.pt"
    save_state_dict(sd, ref)
    out = tmp_path / "spec.json"
    code, stdout, err = run(["spec", "infer", "--weights", ref, "-o", out], capsys)
    assert code == 0
    assert "warning:" in err and "chain" in err  # the plain-chain guess says it is a guess
    spec = Spec.load(out)
    spec.validate(sd)
    assert [(g.name, g.size) for g in spec.groups] == [("layers.0", 48), ("layers.2", 32)]
    assert "layers.0" in stdout  # the human summary lists the groups

    code, stdout, _ = run(["spec", "infer", "--weights", ref, "-o", out, "--json"], capsys)
    doc = json.loads(stdout)
    assert code == 0 and doc["groups"] == 2 and doc["neurons"] == 80 and doc["warnings"]


NET_SOURCE = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 2))
"""


def test_spec_infer_module_traces_the_factory(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = f"fl_cli_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "net.py").write_text(NET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "spec.json"
    code, _, err = run(["spec", "infer", "--module", f"{pkg}.net:make", "--input-shape", "2,3,4,4", "-o", out], capsys)
    assert code == 0, err
    spec = Spec.load(out)
    assert [(g.name, g.size) for g in spec.groups] == [("0", 8), ("3", 6)]
    # the conv feeds the linear layer through a flatten: each channel is 4*4 inputs
    flat = [m for m in spec.group("0").members if m.tensor == "3.weight"]
    assert len(flat) == 1 and flat[0].axis == 1 and flat[0].block == 16
    module = sys.modules[f"{pkg}.net"].make()
    spec.validate(module.state_dict())

    code, stdout, _ = run(["spec", "infer", "--module", f"{pkg}.net:nope", "--input-shape", "1,3,4,4", "-o", out, "--json"], capsys)
    assert code == 2 and "nope" in json.loads(stdout)["error"]["message"]


# ---------------------------------------------------------------- attack and resync


def test_attack_permute_noise_then_resync_recovers_with_psi_100(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    d = files["dir"]
    sus, truth, resynced = d / "sus.safetensors", d / "truth.json", d / "resynced.safetensors"
    code, _, err = run(["attack", files["ref"], "-o", sus, "--spec", files["spec"], "--permute", "all",
                        "--noise", "0.1", "--seed", "3", "--truth", truth], capsys)
    assert code == 0, err
    t = json.loads(truth.read_text())
    assert t["format"] == TRUTH_FORMAT and set(t["groups"]) == {"layers.0", "layers.2"}
    assert all(sorted(p) != p for p in t["groups"].values())  # actually permuted

    code, stdout, err = run(["resync", files["ref"], sus, "--spec", files["spec"], "--truth", truth,
                             "-o", resynced, "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)  # the JSON document alone on stdout
    assert doc["psi"]["model"] == 100.0
    assert doc["psi"]["groups"] == {"layers.0": 100.0, "layers.2": 100.0}
    found = {g["name"]: g["permutation"] for g in doc["resync"]["groups"]}
    assert found == t["groups"]

    ref, out = load_state_dict(files["ref"]), load_state_dict(resynced)
    for name, r in ref.items():
        diff = out[name] - r
        if r.dim() == 1:
            assert torch.equal(out[name], r), name  # biases get no noise: back in place exactly
        else:
            rel = float(diff.norm() / (r.std(correction=0) * r.numel() ** 0.5))
            assert 0.07 < rel < 0.13, (name, rel)  # only the omega = 0.1 noise remains

    code, stdout, _ = run(["resync", files["ref"], sus, "--spec", files["spec"], "--truth", truth, "--device", "cpu"], capsys)
    assert code == 0 and "Psi 100.00 %" in stdout and "layers.0" in stdout


def test_attack_permute_only_round_trips_exactly(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    d = files["dir"]
    sus, resynced = d / "sus.pt", d / "back.safetensors"
    assert run(["attack", files["ref"], "-o", sus, "--spec", files["spec"], "--permute", "layers.2"], capsys)[0] == 0
    ref, s = load_state_dict(files["ref"]), load_state_dict(sus)
    assert torch.equal(s["layers.0.weight"], ref["layers.0.weight"])  # only the named group moved
    assert not torch.equal(s["layers.2.weight"], ref["layers.2.weight"])
    code, stdout, _ = run(["resync", files["ref"], sus, "--spec", files["spec"], "-o", resynced, "--json"], capsys)
    assert code == 0
    moved = {g["name"]: g["moved"] for g in json.loads(stdout)["resync"]["groups"]}
    assert moved["layers.0"] == 0 and moved["layers.2"] > 0
    out = load_state_dict(resynced)
    assert all(torch.equal(out[k], v) for k, v in ref.items())


def test_resync_of_an_unpermuted_copy_moves_nothing(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(["resync", files["ref"], files["ref"], "--spec", files["spec"], "--json"], capsys)
    doc = json.loads(stdout)
    assert code == 0 and doc["resync"]["moved"] == 0 and doc["psi"] is None
    assert all(g["moved"] == 0 for g in doc["resync"]["groups"])


def test_attack_scale_uses_reference_indices(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    d = files["dir"]
    sus, truth = d / "sus.safetensors", d / "truth.json"
    code, _, err = run(["attack", files["ref"], "-o", sus, "--spec", files["spec"], "--permute", "all",
                        "--scale", "0.5", "--neurons", "3,17", "--group", "layers.0", "--truth", truth], capsys)
    assert code == 0, err
    spec = Spec.load(files["spec"])
    perms = {k: torch.tensor(v) for k, v in json.loads(truth.read_text())["groups"].items()}
    back = apply_permutations(load_state_dict(sus), spec, perms)
    ref = load_state_dict(files["ref"])
    w, r = back["layers.0.weight"], ref["layers.0.weight"]
    assert torch.allclose(w[[3, 17]], 1.5 * r[[3, 17]])
    keep = [i for i in range(48) if i not in (3, 17)]
    assert torch.equal(w[keep], r[keep])


# ---------------------------------------------------------------- verify


@needs_report
def test_verify_exit_codes(trained_mlp: tuple[torch.nn.Module, dict[str, torch.Tensor]], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """A permuted copy of a trained MLP matches (exit 0); an unrelated random model of the same
    shapes does not (exit 1). The trained MLP, not the tiny one: its 64-dim rows are what the
    similarity threshold is calibrated for."""
    ref, spec, sus, other = (tmp_path / n for n in ("ref.pt", "spec.json", "sus.safetensors", "other.safetensors"))
    save_state_dict(trained_mlp[1], ref)
    assert run(["spec", "infer", "--weights", ref, "-o", spec], capsys)[0] == 0
    assert run(["attack", ref, "-o", sus, "--spec", spec, "--permute", "all"], capsys)[0] == 0
    code, stdout, _ = run(["verify", ref, sus, "--spec", spec, "--device", "cpu", "--json"], capsys)
    report = json.loads(stdout)
    assert code == 0 and report["verdict"] == "match", report["reasons"]
    assert report["format"] == "findlady.report/2"

    torch.manual_seed(1)
    save_state_dict(MLP().state_dict(), other)  # same shapes, no relation
    code, stdout, _ = run(["verify", ref, other, "--spec", spec, "--device", "cpu", "--json"], capsys)
    assert code == 1 and json.loads(stdout)["verdict"] == "no_match"
    code, stdout, _ = run(["verify", ref, other, "--spec", spec, "--device", "cpu"], capsys)
    assert code == 1 and stdout.startswith("verdict: no_match")


# ---------------------------------------------------------------- watermark


def test_watermark_extract_detects_only_the_marked_layer(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from findlady_core.watermark import generate_key, save_key

    d = files["dir"]
    sd = load_state_dict(files["ref"])
    key = generate_key("layers.2.weight", sd, bits=32, seed=1)
    # plant the key: a mean row w with sign(X w) = bits, plus row noise that averages to zero
    w = torch.linalg.pinv(key.X) @ (2 * key.bits.float() - 1)
    noise = torch.randn(32, 48)
    marked = dict(sd, **{"layers.2.weight": w + noise - noise.mean(0)})
    save_state_dict(marked, d / "marked.safetensors")
    save_key(key, d / "key.safetensors")
    code, stdout, _ = run(["watermark", "extract", d / "marked.safetensors", "--key", d / "key.safetensors", "--json"], capsys)
    doc = json.loads(stdout)
    assert code == 0 and doc["detected"] and doc["bit_errors"] == 0
    code, stdout, _ = run(["watermark", "extract", files["ref"], "--key", d / "key.safetensors"], capsys)
    assert code == 1 and "not detected" in stdout


@pytest.mark.slow
def test_watermark_embed_survives_permutation_only_after_resync(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The paper's story end to end: embed, permute the marked layer's inputs (the watermark
    is lost), resync (it is back). Training is cached under cache_dir() by key seed."""
    model, key = tmp_path / "wm.safetensors", tmp_path / "key.safetensors"
    code, _, err = run(["watermark", "embed", "--model", "mlp", "--layer", "layers.2.weight", "--bits", "32",
                        "--key-seed", "1", "-o", model, "--key-out", key], capsys)
    assert code == 0, err
    spec = tmp_path / "spec.json"
    code, _, err = run(["spec", "infer", "--module", "findlady_examples.models:MLP", "--input-shape", "1,64", "-o", spec], capsys)
    assert code == 0, err
    extract = ["watermark", "extract", "--key", key, "--json"]
    assert run(extract + [model], capsys)[0] == 0
    sus, back = tmp_path / "sus.safetensors", tmp_path / "back.safetensors"
    assert run(["attack", model, "-o", sus, "--spec", spec, "--permute", "layers.0"], capsys)[0] == 0
    code, stdout, _ = run(extract + [sus], capsys)
    assert code == 1 and not json.loads(stdout)["detected"]
    assert run(["resync", model, sus, "--spec", spec, "-o", back], capsys)[0] == 0
    code, stdout, _ = run(extract + [back], capsys)
    assert code == 0 and json.loads(stdout)["detected"]
    if HAS_REPORT:  # verify does the same in one step and says what the permutation hid
        code, stdout, _ = run(["verify", model, sus, "--spec", spec, "--key", key, "--json"], capsys)
        wm = json.loads(stdout)["watermark"]
        assert code == 0 and wm["detected"] and wm["bit_errors_before_resync"] > wm["bit_errors"]


# ---------------------------------------------------------------- bad input


def test_missing_file_exits_2_with_its_name(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    missing = files["dir"] / "nowhere.safetensors"
    code, stdout, err = run(["resync", files["ref"], missing, "--spec", files["spec"]], capsys)
    assert code == 2 and "nowhere.safetensors" in err and stdout == ""
    code, stdout, _ = run(["resync", files["ref"], missing, "--spec", files["spec"], "--json"], capsys)
    doc = json.loads(stdout)
    assert code == 2 and set(doc) == {"error"} and "nowhere.safetensors" in doc["error"]["message"]
    assert doc["error"]["code"]


def test_pickle_file_is_refused(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    bad = files["dir"] / "evil.pt"
    bad.write_bytes(pickle.dumps({"layers.0.weight": [1.0, 2.0]}))
    code, stdout, _ = run(["attack", bad, "-o", files["dir"] / "x.safetensors", "--spec", files["spec"],
                           "--permute", "all", "--json"], capsys)
    doc = json.loads(stdout)
    assert code == 2 and doc["error"]["code"] == "bad_weights" and "pickle" in doc["error"]["message"]
    assert not (files["dir"] / "x.safetensors").exists()


def test_spec_naming_a_missing_tensor_is_refused(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(files["spec"].read_text())
    data["groups"][1]["members"][0]["tensor"] = "layers.9.weight"
    bad = files["dir"] / "bad_spec.json"
    bad.write_text(json.dumps(data))
    code, _, err = run(["resync", files["ref"], files["ref"], "--spec", bad], capsys)
    assert code == 2 and "layers.9.weight" in err
    code, stdout, _ = run(["verify", files["ref"], files["ref"], "--spec", bad, "--json"], capsys) if HAS_REPORT else \
        run(["spec", "check", bad, files["ref"], "--json"], capsys)
    doc = json.loads(stdout)
    assert code == 2 and doc["error"]["code"] == "bad_spec" and "layers.9.weight" in doc["error"]["message"]


def test_usage_errors_exit_2(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = run(["attack", files["ref"], "--spec", files["spec"]], capsys)  # no -o
    assert code == 2 and "-o" in err and stdout == ""
    code, stdout, _ = run(["attack", files["ref"], "-o", "x", "--spec", files["spec"], "--noise", "lots", "--json"], capsys)
    assert code == 2 and json.loads(stdout)["error"]["code"] == "usage"
    # a well-formed command line that asks for nothing, or for a group the spec lacks
    code, _, err = run(["attack", files["ref"], "-o", files["dir"] / "y.pt", "--spec", files["spec"]], capsys)
    assert code == 2 and "nothing to do" in err
    code, _, err = run(["attack", files["ref"], "-o", files["dir"] / "y.pt", "--spec", files["spec"], "--permute", "fc9"], capsys)
    assert code == 2 and "fc9" in err
    nowhere = files["dir"] / "no_such_folder" / "y.pt"
    code, _, err = run(["attack", files["ref"], "-o", nowhere, "--spec", files["spec"], "--permute", "all"], capsys)
    assert code == 2 and "does not exist" in err and not nowhere.parent.exists()


def test_help_runs_as_a_module() -> None:
    r = subprocess.run([sys.executable, "-m", "findlady_cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for cmd in ("spec", "attack", "resync", "verify", "watermark"):
        assert cmd in r.stdout


# ---------------------------------------------------------------- the parser is cheap; --null-margin; registries


def test_top_level_help_loads_neither_torch_nor_the_core() -> None:
    code = ("import sys\nfrom findlady_cli.main import main\nassert main(['--help']) == 0\n"
            "assert 'torch' not in sys.modules and 'findlady_core' not in sys.modules, sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@needs_report
def test_verify_null_margin_skips_the_null(trained_mlp: tuple[torch.nn.Module, dict[str, torch.Tensor]], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    ref, spec, sus = (tmp_path / n for n in ("ref.pt", "spec.json", "sus.safetensors"))
    save_state_dict(trained_mlp[1], ref)
    assert run(["spec", "infer", "--weights", ref, "-o", spec], capsys)[0] == 0
    assert run(["attack", ref, "-o", sus, "--spec", spec, "--permute", "all"], capsys)[0] == 0
    code, stdout, _ = run(["verify", ref, sus, "--spec", spec, "--device", "cpu", "--json", "--null-margin", "0.5"], capsys)
    report = json.loads(stdout)
    assert report["timings"]["null"] == 0
    sim = report["resync"]["similarity"]
    assert sim["null_mean_margin"] == 0.5 and sim["required"] == pytest.approx(0.53)
    assert code == 1 and report["verdict"] == "no_match"  # the (absurd) stored null was used
    code, _, err = run(["verify", ref, sus, "--spec", spec, "--null-margin", "nan"], capsys)
    assert code == 2 and "finite" in err


def test_a_registered_attack_gets_its_flag_and_step(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from findlady_core import attack_steps

    def zero(sd, values, ctx):  # type: ignore[no-untyped-def]
        return {k: torch.zeros_like(v) if k in ctx.target_names(sd) else v for k, v in sd.items()}, "zeroed"

    monkeypatch.setitem(attack_steps.REGISTRY, "zero", attack_steps.Registered(
        "zero", 6, (attack_steps.Option("--zero", "nonneg", "zero every target"),), "--zero: zero the targets.", zero))
    out = files["dir"] / "z.safetensors"
    code, stdout, err = run(["attack", files["ref"], "-o", out, "--spec", files["spec"], "--zero", "1", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["steps"] == ["zeroed"]
    assert all(not v.any() for k, v in load_state_dict(out).items() if v.dim() >= 2)


def test_family_choices_come_from_the_registry(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from findlady_core import families
    from findlady_core.infer import infer_chain_spec

    monkeypatch.setitem(families._REGISTRY, "mychain", families.Family("mychain", infer_chain_spec))
    spec = files["dir"] / "s.json"
    code, _, err = run(["spec", "infer", "--weights", files["ref"], "--family", "mychain", "-o", spec, "-q"], capsys)
    assert code == 0, err
    code, _, err = run(["spec", "infer", "--weights", files["ref"], "--family", "gpt9", "-o", spec], capsys)
    assert code == 2 and "mychain" in err
