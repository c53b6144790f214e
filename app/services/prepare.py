"""Preparing a large reference in the background: its null margin, then status ``ready``.

The null (``app.services.nulls``) re-synchronizes the reference against structureless weights
drawn from its own values: minutes for a billion parameters, far too long for a request. A reference above
``prepare_sync_bytes`` is therefore stored as ``preparing`` and handed to the ``Preparer``, a
thread of the API process; verifications against it stay queued until it is ``ready``
(``app.jobs.runner``), or fail with its reason when it is ``failed``. On start the preparer
takes back every reference still ``preparing`` (an API restarted mid-way). Two API processes may
both prepare one reference: the result is the same and the update is conditional, so the second
only costs time.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from sqlalchemy import select, update

from app.models import Reference, ReferenceStatus
from app.runtime import Runtime
from app.services.nulls import reference_null_margin, solver_version

log = logging.getLogger("findlady.prepare")


def prepare_reference(runtime: Runtime, reference_id: str) -> str:
    """Compute and store the null of one preparing reference; returns its new status."""
    from findlady_core.errors import InputError
    from findlady_core.io import load_state_dict
    from findlady_core.spec import Spec
    from findlady_core.watermark import load_key

    with runtime.sessions() as session:
        ref = session.get(Reference, reference_id)
        if ref is None or ref.status != ReferenceStatus.PREPARING:
            return "gone" if ref is None else str(ref.status)
        spec = Spec.from_dict(ref.spec)
        weights = runtime.blobs.path(ref.sha256)
        key_path = runtime.blobs.path(ref.key_sha256) if ref.key_sha256 else None
    values: dict[str, Any]
    try:
        sd = load_state_dict(weights, mmap=True)
        key = load_key(key_path) if key_path is not None else None
        null = reference_null_margin(sd, spec, key, device=runtime.settings.device)
        values = {"status": ReferenceStatus.READY, "null_margin": null, "null_solver_version": solver_version(),
                  "status_error": None}
    except InputError as e:  # registration checked the files: this is a core refusal, say which
        values = {"status": ReferenceStatus.FAILED, "status_error": {"code": e.code, "message": str(e)[:2000]}}
    except Exception as e:
        log.exception("reference %s: preparation failed", reference_id)
        values = {"status": ReferenceStatus.FAILED,
                  "status_error": {"code": "internal_error", "message": f"{type(e).__name__}: {e}"[:2000]}}
    with runtime.sessions() as session:
        session.execute(update(Reference).where(Reference.id == reference_id,
                                                Reference.status == ReferenceStatus.PREPARING).values(**values))
        session.commit()
    log.info("reference %s: %s", reference_id, values["status"])
    return str(values["status"])


class Preparer:
    """One background thread preparing references, in submission order."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._q: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="findlady-preparer", daemon=True)

    def submit(self, reference_id: str) -> None:
        self._q.put(reference_id)

    def start(self) -> None:
        self._thread.start()
        with self.runtime.sessions() as session:
            ids = list(session.scalars(select(Reference.id).where(Reference.status == ReferenceStatus.PREPARING)
                                       .order_by(Reference.created_at)))
        for reference_id in ids:
            self.submit(reference_id)

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)  # a long preparation is abandoned; the next start takes it back

    def _run(self) -> None:
        while True:
            reference_id = self._q.get()
            if reference_id is None:
                return
            try:
                prepare_reference(self.runtime, reference_id)
            except Exception:  # the database may be down: the next start takes it back
                log.exception("reference %s: preparer error", reference_id)
