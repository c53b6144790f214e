"""The dashboard: a static single-page app shipped in ``app/ui/`` and served at ``/ui/``.

``index.html`` answers every page of the app (``/ui/``, ``/ui/verifications/{id}``,
``/ui/references/{id}``); its script reads ``location.pathname``. Assets come from a fixed
list (no path from the request touches the file system). The API key lives in the browser's
sessionStorage and travels as a bearer header on API calls; these pages need none.

Every answer carries a strict Content-Security-Policy: scripts only from this origin (no inline
scripts, no eval), nothing from elsewhere, no framing.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from starlette.responses import RedirectResponse, Response

from app.errors import ApiError

router = APIRouter(include_in_schema=False)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "draw.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


def _file(name: str) -> bytes:
    return resources.files("app.ui").joinpath(name).read_bytes()


def _page() -> Response:
    return Response(_file("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_bare() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
def ui_home() -> Response:
    return _page()


@router.get("/ui/verifications/{job_id}")
def ui_verification(job_id: str) -> Response:
    return _page()


@router.get("/ui/references/{reference_id}")
def ui_reference(reference_id: str) -> Response:
    return _page()


@router.get("/ui/assets/{name}")
def ui_asset(name: str) -> Response:
    media = ASSETS.get(name)
    if media is None:
        raise ApiError(404, "not_found", f"no dashboard asset {name!r}")
    return Response(_file(name), media_type=media, headers=HEADERS)


@router.get("/favicon.ico")
def favicon() -> Response:
    return Response(_file("favicon.svg"), media_type="image/svg+xml", headers=HEADERS)
