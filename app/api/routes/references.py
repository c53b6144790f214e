"""Reference models: owners upload weights (+ optional spec and watermark key) and list them.

Weights and keys never leave the server: responses carry hashes, sizes and the spec only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from app.api.deps import ERRORS, RuntimeDep, SessionDep, allow
from app.core.security import Principal
from app.errors import ApiError
from app.models import Reference, ReferenceStatus, Role
from app.schemas import ReferenceCreated, ReferenceDetail, ReferenceList, ReferenceOut
from app.services.access import get_reference as visible_reference
from app.services.access import visible_references
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
                    "required": ["name", "weights"],
                    "properties": {
                        "name": {"type": "string", "description": "model name; each upload adds a version"},
                        "weights": {"type": "string", "format": "binary", "description": "safetensors or torch.save zip"},
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
    form = await read_multipart(request, files={"weights", "spec", "key"}, texts={"name"}, store=runtime.blobs,
                                max_bytes=runtime.settings.max_upload_bytes)
    try:
        if "weights" not in form.files:
            raise ApiError(422, "missing_field", "form field 'weights' (the model's weight file) is required")
        if "name" not in form.texts:
            raise ApiError(422, "missing_field", "form field 'name' is required")
        ref, notes = await run_in_threadpool(
            register_reference, runtime, principal, form.texts["name"], form.files["weights"],
            form.files.get("spec"), form.files.get("key"),
        )
    finally:
        form.discard()  # committed blobs were moved away; this removes what is left
    if ref.status == ReferenceStatus.PREPARING:
        preparer = getattr(request.app.state, "preparer", None)
        if preparer is not None:  # else (an API without workers) the next start takes it
            preparer.submit(ref.id)
    body = _out(ref, ReferenceCreated, warnings=notes)
    return JSONResponse(body.model_dump(mode="json"), status_code=201, headers={"Location": f"/v1/references/{ref.id}"})


@router.get("", response_model=ReferenceList, summary="List my references (owner)")
def list_references(session: SessionDep, name: str | None = None,
                    principal: Principal = allow(Role.OWNER, action="listing references")) -> ReferenceList:
    q = select(Reference).where(visible_references(principal))
    if name is not None:
        q = q.where(Reference.name == name)
    refs = session.scalars(q.order_by(Reference.name, Reference.version)).all()
    return ReferenceList(items=[_out(r) for r in refs])


@router.get("/{reference_id}", response_model=ReferenceDetail, summary="One of my references (owner)",
            responses={404: {"description": "no such reference among yours"}})
def get_reference(reference_id: str, session: SessionDep,
                  principal: Principal = allow(Role.OWNER, action="reading references")) -> ReferenceDetail:
    return _out(visible_reference(session, principal, reference_id), ReferenceDetail)
