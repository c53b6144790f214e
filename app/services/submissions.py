"""Accepting uploads: validate everything first, store blobs second, insert rows last.

A refused upload leaves no row and no blob behind: nothing is written before the weights,
spec and key have been parsed and checked, and blobs this request created are removed again
if the database transaction fails (unless another row already points at them).
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import audit
from app.blobs import TempBlob
from app.core.security import Principal
from app.errors import ApiError
from app.models import Reference, Verification
from app.runtime import Runtime

MAX_SPEC_BYTES = 64 * 1024 * 1024


def _input_error(e: Exception, tmp: TempBlob, field: str) -> ApiError:
    """A core InputError as a 422, naming the form field instead of the temporary file."""
    code = getattr(e, "code", "bad_input")
    return ApiError(422, code, f"{field}: {str(e).replace(tmp.path.name, repr(field))}")


def _load_weights(runtime: Runtime, tmp: TempBlob, field: str) -> dict[str, torch.Tensor]:
    from findlady_core.errors import InputError
    from findlady_core.io import load_state_dict

    try:
        return load_state_dict(tmp.path, max_bytes=runtime.settings.max_upload_bytes)
    except InputError as e:
        raise _input_error(e, tmp, field) from None


def shapes_of(sd: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()}


def _blob_in_use(session: Session, sha: str) -> bool:
    return bool(
        session.scalar(
            select(func.count()).select_from(Reference).where((Reference.sha256 == sha) | (Reference.key_sha256 == sha))
        )
        or session.scalar(select(func.count()).select_from(Verification).where(Verification.suspect_sha256 == sha))
    )


def _drop_new_blobs(runtime: Runtime, created: list[str]) -> None:
    if not created:
        return
    with runtime.sessions() as session:
        for sha in created:
            if not _blob_in_use(session, sha):
                runtime.blobs.remove(sha)


def register_reference(
    runtime: Runtime, principal: Principal, name: str, weights: TempBlob, spec_file: TempBlob | None, key_file: TempBlob | None
) -> tuple[Reference, list[str]]:
    """Validate and store a reference model; returns the row and any warnings (e.g. inferred spec)."""
    from findlady_core.errors import InputError
    from findlady_core.io import count_parameters
    from findlady_core.spec import Spec
    from findlady_core.watermark import check_key, load_key

    name = name.strip()
    if not name or len(name) > 200:
        raise ApiError(422, "bad_name", "name must be 1 to 200 characters")
    sd = _load_weights(runtime, weights, "weights")
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
        from findlady_core.infer import infer_spec

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                spec = infer_spec(sd)
            spec.validate(sd)
        except InputError as e:
            raise ApiError(422, getattr(e, "code", "bad_spec"), f"spec: none uploaded and none could be inferred: {e}") from None
        notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        source = "inferred"
    key_layer = None
    if key_file is not None:
        try:
            key = load_key(key_file.path)
            check_key(key, sd, spec)
        except InputError as e:
            raise _input_error(e, key_file, "key") from None
        key_layer = key.layer
    parameters = count_parameters(sd)
    shapes = shapes_of(sd)
    del sd

    created: list[str] = []
    try:
        sha, new = runtime.blobs.commit(weights)
        if new:
            created.append(sha)
        key_sha = None
        if key_file is not None:
            key_sha, new = runtime.blobs.commit(key_file)
            if new:
                created.append(key_sha)
        for _ in range(5):  # a concurrent upload may take the same version number: try the next
            try:
                ref = _insert_reference(runtime, principal, name, sha, weights.size, parameters, spec.to_dict(),
                                        source, key_sha, key_layer, shapes)
                return ref, notes
            except IntegrityError:
                continue
        raise ApiError(409, "conflict", f"could not allocate a version for {name!r}; retry")
    except BaseException:
        _drop_new_blobs(runtime, created)
        raise


def _insert_reference(
    runtime: Runtime, principal: Principal, name: str, sha: str, size: int, parameters: int, spec: dict[str, Any],
    source: str, key_sha: str | None, key_layer: str | None, shapes: dict[str, Any],
) -> Reference:
    with runtime.sessions() as session:
        version = (session.scalar(
            select(func.max(Reference.version)).where(Reference.owner_id == principal.account_id, Reference.name == name)
        ) or 0) + 1
        ref = Reference(
            owner_id=principal.account_id, name=name, version=version, sha256=sha, size_bytes=size,
            parameters=parameters, spec=spec, spec_source=source, key_sha256=key_sha, key_layer=key_layer, shapes=shapes,
        )
        session.add(ref)
        session.flush()
        audit.append(session, runtime.secret, "reference.registered", {
            "reference_id": ref.id, "owner_id": principal.account_id, "name": name, "version": version,
            "sha256": sha, "key_sha256": key_sha,
        })
        session.commit()
        return ref


def visible_reference(session: Session, principal: Principal, reference_id: str) -> Reference:
    """The reference if this caller may verify against it; 404 otherwise (never 403: no leak)."""
    ref = None
    try:
        uuid.UUID(reference_id)
    except ValueError:
        pass
    else:
        ref = session.get(Reference, reference_id)
    if ref is None or (principal.role == "owner" and ref.owner_id != principal.account_id):
        raise ApiError(404, "not_found", f"no reference {reference_id!r}")
    return ref


def _is_float(dtype: str) -> bool:
    t = getattr(torch, dtype, None)
    return isinstance(t, torch.dtype) and t.is_floating_point


def check_shapes(reference: Mapping[str, Any], suspect: Mapping[str, Any]) -> None:
    """The suspect has exactly the reference's tensors with the same shapes, floating where the
    reference is (422 naming one)."""
    for name, (shape, dtype) in reference.items():
        if name not in suspect:
            raise ApiError(422, "shape_mismatch", f"suspect: tensor {name!r} of the reference is missing")
        if suspect[name][0] != shape:
            raise ApiError(422, "shape_mismatch",
                           f"suspect: tensor {name!r} has shape {tuple(suspect[name][0])}, the reference has {tuple(shape)}")
        if _is_float(suspect[name][1]) != _is_float(dtype):
            # Another float precision is a legitimate (quantized) copy; ints for floats are not.
            raise ApiError(422, "dtype_mismatch",
                           f"suspect: tensor {name!r} has dtype {suspect[name][1]}, the reference has {dtype}")
    extra = sorted(set(suspect) - set(reference))
    if extra:
        raise ApiError(422, "shape_mismatch", f"suspect: tensor {extra[0]!r} is not in the reference"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def submit_verification(runtime: Runtime, principal: Principal, reference_id: str, suspect: TempBlob) -> Verification:
    """Validate the suspect, store it, insert a queued job and its audit event (not yet enqueued)."""
    with runtime.sessions() as session:
        ref = visible_reference(session, principal, reference_id.strip())
        ref_shapes, ref_id = ref.shapes, ref.id
    sd = _load_weights(runtime, suspect, "suspect")
    check_shapes(ref_shapes, shapes_of(sd))
    del sd
    created: list[str] = []
    try:
        sha, new = runtime.blobs.commit(suspect)
        if new:
            created.append(sha)
        with runtime.sessions() as session:
            job = Verification(
                reference_id=ref_id, submitter_id=principal.account_id, suspect_sha256=sha,
                suspect_size_bytes=suspect.size, status="queued", attempts=0,
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
