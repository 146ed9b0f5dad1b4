"""``GET /``: the page to try the model and watch training runs (static files in ``web/``, no build step).

The page fetches nothing from the internet (a Content-Security-Policy holds it to this server) and
calls the same HTTP API as any client, with ``Authorization: Bearer`` when the server has a token.
Whether to ask for a token, and whether to show training runs, is written into the page itself,
so it never has to probe with a request that fails.
"""
from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from raytimm.serve.http import HTTPError

WEB_DIR = Path(__file__).resolve().with_name("web")
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                                "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
router = APIRouter()
_flags = {"auth": False, "training": False}


def install(*, auth_required: bool, training: bool) -> None:
    """Called by each Ingress replica: whether the page asks for a token and shows training runs."""
    _flags.update(auth=bool(auth_required), training=bool(training))


@functools.lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (WEB_DIR / name).read_bytes()


def index_html(*, auth_required: bool, training: bool) -> str:
    """index.html with the server's two facts filled in."""
    return (_read("index.html").decode("utf-8")
            .replace("__AUTH__", "required" if auth_required else "none")
            .replace("__TRAINING__", "on" if training else "off"))


# Not API routes (HTML and static files): kept out of the OpenAPI document.
@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    """The page (public: it holds no data; its API calls carry the token)."""
    return HTMLResponse(index_html(auth_required=_flags["auth"], training=_flags["training"]), headers=HEADERS)


@router.get("/web/{name}", include_in_schema=False)
async def web_file(name: str):
    """The page's script and style sheet (only the files listed in STATIC)."""
    if name not in STATIC:
        raise HTTPError(404, f"no such file: {name[:60]!r}")
    return Response(_read(name), media_type=STATIC[name], headers=HEADERS)
