"""Public material for checking reports without an account: the signing keys and the report
schema."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import JSONResponse

from app.api.deps import RuntimeDep
from app.core.signing import SigningKeys
from app.report_models import SigningKeyList

router = APIRouter(tags=["public"])


@router.get("/v1/signing-keys", response_model=SigningKeyList,
            summary="Ed25519 public keys that signed reports (current first, then retired ones)")
def signing_keys(runtime: RuntimeDep) -> SigningKeyList:
    from findlady_core.signing import public_entry

    return SigningKeyList.model_validate({"keys": [public_entry(k) for k in SigningKeys(runtime.settings).public_keys()]})


@router.get("/v1/schemas/report", summary="JSON Schema (draft 2020-12) of the report, findlady.report/2",
            responses={200: {"content": {"application/schema+json": {"schema": {"type": "object"}}}}})
def report_schema() -> JSONResponse:
    from findlady_core.report_format import schema

    body: dict[str, Any] = schema()
    return JSONResponse(body, media_type="application/schema+json")
