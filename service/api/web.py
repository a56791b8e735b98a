"""The web app for people, served by the API itself: ``/`` redirects to ``/ui/``, where the built app lives.

The app is built from ``service/web`` into ``service/web/dist`` by ``scripts/setup.sh`` (or the Dockerfile);
the ``web_dist`` setting points elsewhere. Without a build, ``/ui/`` says how to build it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from service.api import viewer

WEB_DIST = Path(__file__).resolve().parents[1] / "web" / "dist"
NOT_BUILT = (
    "The ttaseg web app is not built on this server.\n"
    "Build it with `bash scripts/setup.sh` (or `npm ci && npm run build` in service/web), then reload.\n"
    "The HTTP API works without it: see /docs.\n"
)


class WebApp(StaticFiles):
    """The built single-page app; a plain 503 explaining how to build it when it is missing."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not (Path(str(self.directory)) / "index.html").is_file():
            await PlainTextResponse(NOT_BUILT, status_code=503)(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


router = APIRouter()
router.include_router(viewer.router)


@router.get("/", include_in_schema=False)
def home() -> RedirectResponse:
    """The web app's home."""
    return RedirectResponse("/ui/")


def web_app(directory: Path | None) -> WebApp:
    """The static app to mount at ``/ui`` (``directory`` default: the build in the source tree)."""
    return WebApp(directory=directory or WEB_DIST, html=True, check_dir=False)
