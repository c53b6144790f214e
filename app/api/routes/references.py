"""Reference models: owners upload weights (+ optional spec and watermark key) and list them.

Weights and keys never leave the server: responses carry hashes, sizes and the spec only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import and_, or_, select
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from app.api.deps import ERRORS, SUBMITTERS, RuntimeDep, SessionDep, allow
from app.core.security import Principal
from app.errors import ApiError
from app.models import Reference, ReferenceStatus, Role
from app.schemas import ReferenceCreated, ReferenceDetail, ReferenceOut, ReferencePage
from app.services import paging
from app.services.access import get_reference as visible_reference
from app.services.access import readable_references
from app.services.model_files import collect
from app.services.submissions import register_reference
from app.uploads import read_multipart

router = APIRouter(prefix="/v1/references", tags=["references"], responses=ERRORS)

UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "description": "model name; each upload adds a version"},
                        "weights": {"type": "array", "items": {"type": "string", "format": "binary"},
                                    "description": "safetensors or torch.save zip; repeated: one part per shard, "
                                    "each with its file name as the index names it"},
                        "index": {"type": "string", "format": "binary", "description": "model.safetensors.index.json"},
                        "config": {"type": "string", "format": "binary", "description": "config.json"},
                        "archive": {"type": "string", "format": "binary",
                                    "description": "instead of weights: a .zip or .tar of the model folder"},
                        "num_heads": {"type": "integer", "minimum": 1,
                                      "description": "attention heads per layer, for a bare BERT file without config"},
                        "allow_guess": {"type": "boolean", "description": "store a spec guessed as a plain chain"},
                        "spec": {"type": "string", "format": "binary", "description": "findlady.spec/1 JSON; inferred if absent"},
                        "key": {"type": "string", "format": "binary",
                                "description": "watermark key (safetensors: layer, projection matrix, bits)"},
                    },
                }
            }
        },
    }
}


def _out(ref: Reference, cls: type[ReferenceOut] = ReferenceOut, **extra: Any) -> Any:
    fields: dict[str, Any] = dict(
        id=ref.id, name=ref.name, version=ref.version, sha256=ref.sha256, size_bytes=ref.size_bytes,
        parameters=ref.parameters, groups=len(ref.spec.get("groups", [])), spec_source=ref.spec_source,
        has_key=ref.key_sha256 is not None, key_layer=ref.key_layer, created_at=ref.created_at,
        status=ref.status, status_error=ref.status_error,
    )
    if cls is not ReferenceOut:
        fields["spec"] = ref.spec
    return cls(**fields, **extra)


@router.post("", status_code=201, response_model=ReferenceCreated, openapi_extra=UPLOAD_SCHEMA,
             summary="Register a reference model (owner)",
             responses={413: {"description": "upload too large"}, 422: {"description": "bad weights, spec or key"}})
async def create_reference(request: Request, runtime: RuntimeDep,
                           principal: Principal = allow(Role.OWNER, action="registering references")) -> JSONResponse:
    form = await read_multipart(request, files={"spec", "key", "index", "config", "archive"},
                                texts={"name", "num_heads", "allow_guess"}, repeat={"weights"},
                                store=runtime.blobs, max_bytes=runtime.settings.max_upload_bytes)
    weights = None
    try:
        if "name" not in form.texts:
            raise ApiError(422, "missing_field", "form field 'name' is required")
        num_heads, allow_guess = _num_heads(form.texts.get("num_heads")), _flag(form.texts.get("allow_guess"), "allow_guess")
        weights = await run_in_threadpool(collect, runtime, form, "weights")
        ref, notes = await run_in_threadpool(
            lambda: register_reference(runtime, principal, form.texts["name"], weights, form.files.get("spec"),
                                       form.files.get("key"), num_heads=num_heads, allow_guess=allow_guess))
    finally:
        if weights is not None:
            weights.discard()  # a staged folder not committed
        form.discard()  # committed blobs were moved away; this removes what is left
    if ref.status == ReferenceStatus.PREPARING:
        preparer = getattr(request.app.state, "preparer", None)
        if preparer is not None:  # else (an API without workers) the next start takes it
            preparer.submit(ref.id)
    body = _out(ref, ReferenceCreated, warnings=notes)
    return JSONResponse(body.model_dump(mode="json"), status_code=201, headers={"Location": f"/v1/references/{ref.id}"})


def _num_heads(text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 4096:
        raise ApiError(422, "bad_field", f"num_heads must be an integer from 1 to 4096, got {text[:40]!r}")
    return n


def _flag(text: str | None, name: str) -> bool:
    value = (text or "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ApiError(422, "bad_field", f"{name} must be true or false, got {value[:40]!r}")
    return value in ("true", "1")


@router.get("", response_model=ReferencePage, summary="List my references, or those shared with me (auditor)")
def list_references(session: SessionDep, name: str | None = Query(None, max_length=200),
                    limit: int = Query(paging.DEFAULT_LIMIT, ge=1, le=paging.MAX_LIMIT, description=paging.LIMIT_DOC),
                    cursor: str | None = Query(None, max_length=2000, description="next_cursor of the previous page"),
                    principal: Principal = allow(*SUBMITTERS, action="listing references")) -> ReferencePage:
    q = select(Reference).where(readable_references(principal))
    if name is not None:
        q = q.where(Reference.name == name)
    if cursor is not None:  # keyset on (name, version, id): stable while references are added
        n, v, i = paging.decode(cursor, (str, int, str))
        q = q.where(or_(Reference.name > n, and_(Reference.name == n, Reference.version > v),
                        and_(Reference.name == n, Reference.version == v, Reference.id > i)))
    refs = session.scalars(q.order_by(Reference.name, Reference.version, Reference.id).limit(limit + 1)).all()
    more, refs = len(refs) > limit, refs[:limit]
    last = refs[-1] if refs else None
    return ReferencePage(items=[_out(r) for r in refs],
                         next_cursor=paging.encode([last.name, last.version, last.id]) if more and last else None)


@router.get("/{reference_id}", response_model=ReferenceDetail,
            summary="One of my references, or one shared with me (auditor)",
            responses={404: {"description": "no such reference among yours or those shared with you"}})
def get_reference(reference_id: str, session: SessionDep,
                  principal: Principal = allow(*SUBMITTERS, action="reading references")) -> ReferenceDetail:
    return _out(visible_reference(session, principal, reference_id, read=True), ReferenceDetail)
