"""Accepting uploads: validate everything first, store blobs second, insert rows last.

A refused upload leaves no row and no blob behind: nothing is written before the weights
(a single file or a model folder: ``app.services.model_files``), spec and key have been
parsed and checked, and blobs this request created are removed again
if the database transaction fails (unless another row already points at them). Weights are
validated memory-mapped (``load_state_dict(mmap=True)``), so the API's memory does not grow
with the file. A reference's null margin is computed once and stored with it
(``app.services.nulls``): here for references up to ``prepare_sync_bytes``, in the background
for larger ones (status ``preparing``, ``app.services.prepare``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import audit
from app.blobs import TempBlob
from app.core.security import Principal
from app.errors import ApiError
from app.models import JobStatus, Reference, ReferenceStatus, Verification
from app.runtime import Runtime
from app.services.access import get_reference
from app.services.model_files import ModelUpload
from app.services.nulls import reference_null_margin, solver_version

MAX_SPEC_BYTES = 64 * 1024 * 1024


def _input_error(e: Exception, tmp: TempBlob, field: str) -> ApiError:
    """A core InputError as a 422, naming the form field instead of the temporary file."""
    code = getattr(e, "code", "bad_input")
    return ApiError(422, code, f"{field}: {str(e).replace(tmp.path.name, repr(field))}")


def _blob_in_use(session: Session, sha: str) -> bool:
    return bool(
        session.scalar(
            select(func.count()).select_from(Reference).where((Reference.sha256 == sha) | (Reference.key_sha256 == sha))
        )
        or session.scalar(select(func.count()).select_from(Verification).where(
            (Verification.suspect_sha256 == sha) | (Verification.resynced_sha256 == sha)))
    )


def _drop_new_blobs(runtime: Runtime, created: list[str]) -> None:
    if not created:
        return
    with runtime.sessions() as session:
        for sha in created:
            if not _blob_in_use(session, sha):
                runtime.blobs.remove(sha)


def register_reference(
    runtime: Runtime, principal: Principal, name: str, weights: ModelUpload, spec_file: TempBlob | None,
    key_file: TempBlob | None, *, num_heads: int | None = None, allow_guess: bool = False,
) -> tuple[Reference, list[str]]:
    """Validate and store a reference model; returns the row and any warnings (e.g. inferred spec).

    Without a spec file the spec comes from ``findlady_core.choose.spec_for`` (the folder's
    config, ``num_heads``); a chain guess is stored only with ``allow_guess``."""
    from findlady_core.compat import shapes_of
    from findlady_core.errors import InputError
    from findlady_core.io import count_parameters
    from findlady_core.spec import Spec
    from findlady_core.watermark import check_key, load_key

    name = name.strip()
    if not name or len(name) > 200:
        raise ApiError(422, "bad_name", "name must be 1 to 200 characters")
    sd = weights.load(runtime)
    notes: list[str] = []
    if spec_file is not None:
        if spec_file.size > MAX_SPEC_BYTES:
            raise ApiError(422, "bad_spec", f"spec: larger than {MAX_SPEC_BYTES} bytes")
        try:
            spec = Spec.from_json(spec_file.path.read_bytes())
            spec.validate(sd)
        except InputError as e:
            raise _input_error(e, spec_file, "spec") from None
        except RecursionError:  # json.loads on absurdly nested arrays (Spec.from_json lets it through)
            raise ApiError(422, "bad_spec", "spec: JSON nested too deeply") from None
        source = "uploaded"
    else:
        from findlady_core.choose import spec_for

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                spec = spec_for(sd, weights.config, num_heads=num_heads, allow_guess=allow_guess)
            spec.validate(sd)
        except InputError as e:
            raise ApiError(422, getattr(e, "code", "bad_spec"), f"spec: none uploaded and none could be inferred: {e}") from None
        notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        source = "inferred"
    key = None
    if key_file is not None:
        try:
            key = load_key(key_file.path)
            check_key(key, sd, spec)
        except InputError as e:
            raise _input_error(e, key_file, "key") from None
        _check_key_reads(key, sd)
    null_margin: float | None = None
    if weights.size <= runtime.settings.prepare_sync_bytes:
        try:
            null_margin = reference_null_margin(sd, spec, key, device=runtime.settings.device)
        except InputError as e:
            raise ApiError(422, getattr(e, "code", "bad_weights"), f"weights: {e}") from None
    row = _NewReference(
        name=name, size=weights.size, parameters=count_parameters(sd), spec=spec.to_dict(), spec_source=source,
        key_layer=None if key is None else key.layer, shapes=shapes_of(sd), null_margin=null_margin,
        config=weights.config,
    )
    del sd

    created: list[str] = []
    try:
        sha, new = weights.commit(runtime)
        if new:
            created.append(sha)
        key_sha = None
        if key_file is not None:
            key_sha, new = runtime.blobs.commit(key_file)
            if new:
                created.append(key_sha)
        for _ in range(5):  # a concurrent upload may take the same version number: try the next
            try:
                return _insert_reference(runtime, principal, row, sha, key_sha), notes
            except IntegrityError:
                continue
        raise ApiError(409, "conflict", f"could not allocate a version for {name!r}; retry")
    except BaseException:
        _drop_new_blobs(runtime, created)
        raise


def _check_key_reads(key: Any, sd: dict[str, Any]) -> None:
    """A key that does not read on the reference itself would call every genuine copy
    "watermark missing or damaged": refuse it (422) with its bit errors."""
    from findlady_core.report import DEFAULT_ALPHA
    from findlady_core.watermark import detect

    wm = detect(sd, key, alpha=DEFAULT_ALPHA)
    if not wm["detected"]:
        raise ApiError(422, "key_not_detected", (
            f"key: the watermark does not read on the reference itself: {wm['bit_errors']}/{wm['bits']} bit errors "
            f"in {key.layer!r}, p = {wm['p_value']:.3g} (needs p < {DEFAULT_ALPHA:g}); was the key embedded in these weights?"))


@dataclass(frozen=True)
class _NewReference:
    """What registration checked and computed, before the blobs are stored."""

    name: str
    size: int
    parameters: int
    spec: dict[str, Any]
    spec_source: str
    key_layer: str | None
    shapes: dict[str, Any]
    null_margin: float | None  # None: too large to compute in the request, prepared in the background
    config: dict[str, Any] | None = None  # the folder's config.json, when it had one


def _insert_reference(runtime: Runtime, principal: Principal, row: _NewReference, sha: str, key_sha: str | None) -> Reference:
    with runtime.sessions() as session:
        version = (session.scalar(
            select(func.max(Reference.version)).where(Reference.owner_id == principal.account_id, Reference.name == row.name)
        ) or 0) + 1
        ref = Reference(
            owner_id=principal.account_id, name=row.name, version=version, sha256=sha, size_bytes=row.size,
            parameters=row.parameters, spec=row.spec, spec_source=row.spec_source, key_sha256=key_sha,
            key_layer=row.key_layer, shapes=row.shapes, null_margin=row.null_margin,
            null_solver_version=None if row.null_margin is None else solver_version(), config=row.config,
            status=ReferenceStatus.READY if row.null_margin is not None else ReferenceStatus.PREPARING,
        )
        session.add(ref)
        session.flush()
        audit.append(session, runtime.secret, "reference.registered", {
            "reference_id": ref.id, "owner_id": principal.account_id, "name": row.name, "version": version,
            "sha256": sha, "key_sha256": key_sha,
        })
        session.commit()
        return ref


def submit_verification(runtime: Runtime, principal: Principal, reference_id: str, suspect: ModelUpload) -> Verification:
    """Validate the suspect, store it, insert a queued job and its audit event (not yet enqueued)."""
    from findlady_core.compat import IncompatibleError, check_compatible, shapes_of

    from findlady_core.spec import Spec

    with runtime.sessions() as session:
        ref = get_reference(session, principal, reference_id.strip())
        ref_shapes, ref_id, ref_spec = ref.shapes, ref.id, ref.spec
    sd = suspect.load(runtime)
    try:
        # the spec's width groups may differ (split or dummy neurons, at most 2x)
        check_compatible(ref_shapes, shapes_of(sd), spec=Spec.from_dict(ref_spec) if ref_spec else None)
    except IncompatibleError as e:
        raise ApiError(422, e.code, str(e)) from None
    del sd
    created: list[str] = []
    try:
        sha, new = suspect.commit(runtime)
        if new:
            created.append(sha)
        with runtime.sessions() as session:
            job = Verification(
                reference_id=ref_id, submitter_id=principal.account_id, suspect_sha256=sha,
                suspect_size_bytes=suspect.size, status=JobStatus.QUEUED, attempts=0,
            )
            session.add(job)
            session.flush()
            audit.append(session, runtime.secret, "verification.submitted", {
                "reference_id": ref_id, "submitter_id": principal.account_id, "suspect_sha256": sha,
            }, job.id)
            session.commit()
            return job
    except BaseException:
        _drop_new_blobs(runtime, created)
        raise
