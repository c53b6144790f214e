"""The core's progress protocol: ``callback(phase, done, total)`` from every long step of ``verify``."""

from __future__ import annotations

import io

import pytest
import torch

from findlady_core.attacks import permute
from findlady_core.progress import PHASES, Recorder, TqdmProgress
from findlady_core.report import verify
from findlady_core.resync import resync
from findlady_core.spec import Spec

SIZES = (6, 40, 12, 3)


def _mlp(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True), start=1):
        sd[f"fc{i}.weight"] = torch.randn(b, a, generator=g)
        sd[f"fc{i}.bias"] = torch.randn(b, generator=g)
    return sd


SPEC = Spec.from_dict({"format": "findlady.spec/1", "groups": [
    {"name": f"fc{i}", "size": SIZES[i], "members": [{"tensor": f"fc{i}.weight", "axis": 0},
                                                      {"tensor": f"fc{i}.bias", "axis": 0},
                                                      {"tensor": f"fc{i + 1}.weight", "axis": 1}]}
    for i in (1, 2)]})


def _check_phase(calls: list[tuple[str, int, int, float]], phase: str) -> list[tuple[int, int]]:
    seen = [(d, t) for p, d, t, _ in calls if p == phase]
    assert seen, f"phase {phase} never reported"
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1], seen  # starts at 0, ends complete
    assert all(0 <= d <= t for d, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # never goes back
    return seen


def test_verify_reports_every_phase_in_order_each_from_zero_to_complete() -> None:
    ref = _mlp(0)
    sus = permute(ref, SPEC, seed=1).state_dict
    rec = Recorder()
    report = verify(ref, sus, SPEC, device="cpu", progress=rec)
    assert report["verdict"] in ("match", "match_modified")
    assert rec.phases() == ["null", "resync", "integrity", "watermark"]
    for phase in rec.phases():
        assert phase in PHASES
        _check_phase(rec.calls, phase)
    # integrity counts neurons: one step per unit (both groups, then the unpermuted output layer)
    assert [d for d, _ in _check_phase(rec.calls, "integrity")] == [0, 40, 52, 55]


def test_resync_units_weigh_a_wide_group_more_than_a_narrow_one() -> None:
    ref = _mlp(0)
    rec = Recorder()
    result = resync(ref, permute(ref, SPEC, seed=2).state_dict, SPEC, device="cpu", progress=rec)
    assert all(g.moved for g in result.groups)
    seen = _check_phase(rec.calls, "resync")
    steps = [b - a for (a, _), (b, _) in zip(seen, seen[1:])]
    # fc1: 40 neurons x (6 + 1 + 12) evidence; fc2: 12 x (40 + 1 + 3): fc1's step is the bigger one
    assert max(steps) == 40 * 40 * 19 + 40**3


def test_a_callback_that_raises_stops_the_work() -> None:
    class Stop(Exception):
        pass

    def stop(phase: str, done: int, total: int) -> None:
        if phase == "resync" and done > 0:
            raise Stop

    with pytest.raises(Stop):
        resync(_mlp(0), _mlp(1), SPEC, device="cpu", progress=stop)


def test_tqdm_renders_on_the_given_stream_only(capsys: pytest.CaptureFixture[str]) -> None:
    err = io.StringIO()
    bars = TqdmProgress(file=err)
    resync(_mlp(0), _mlp(1), SPEC, device="cpu", progress=bars)
    assert "resync" in err.getvalue() and bars.bar is None  # drawn, then closed when complete
    assert capsys.readouterr() == ("", "")
