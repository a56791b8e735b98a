"""The API application: factory, lifespan (process-wide resources) and the one error path to clients.

Routes live in ``service.api``, one router per resource. The API never runs models: it streams uploads to
storage, validates every scan with the ML core's reader, writes the job record and sends a Celery task.
Every client error is answered ``{"detail": "<short reason>"}``: raise :class:`service.errors.ApiError`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from models.bundle import BundleError
from models.io import InputError
from service.api import dicomweb, docs, jobs, models, operations, results, web
from service.auth import KeyRing, load_keys
from service.celery_app import make_celery
from service.config import Settings
from service.db import Database, migrate
from service.deps import AppState, authenticate
from service.errors import ApiError, sanitise, validation_text
from service.health import worker_timeout
from service.metrics import Metrics
from service.schemas import PATTERN_HINTS
from service.storage import get_storage

log = logging.getLogger(__name__)


def _app_state(settings: Settings) -> AppState:
    """Open the database (migrated to head), storage, key ring, Celery app and metrics."""
    db = Database(settings.resolved_database_url)
    migrate(db.engine)
    keys = KeyRing(load_keys(settings))
    if not len(keys):
        log.warning("no API keys configured: every request will be refused (set TTASEG_API_KEYS)")
    return AppState(
        settings=settings,
        db=db,
        storage=get_storage(settings.resolved_storage_dir),
        keys=keys,
        celery=make_celery(settings),
        metrics=Metrics(db, worker_fresh_seconds=worker_timeout(settings)),
        checks=ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz"),
    )


def error_response(
    request: Request, status: int, detail: str, headers: dict[str, str] | None = None
) -> Response:
    """The answer to every client error: ``{"detail": ...}`` (short, no server path); submissions are counted."""
    route = request.scope.get("route")
    state: AppState | None = getattr(request.app.state, "ttaseg", None)
    if state is not None and request.method == "POST" and getattr(route, "name", None) == jobs.SUBMIT_ROUTE:
        state.metrics.rejected.labels(str(status)).inc()
    if status in (204, 304):
        return Response(status_code=status, headers=headers)
    return JSONResponse({"detail": sanitise(detail)}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Route ApiError, HTTP and validation errors, ML-core input errors and client disconnects to one path."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(request, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(request, exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, 422, validation_text(exc.errors(), PATTERN_HINTS))

    async def _input_error(request: Request, exc: Exception) -> Response:
        log.info("bad input %s %s: %s", request.method, request.url.path, sanitise(str(exc)))
        return error_response(request, 422, str(exc))

    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(BundleError, _input_error)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return error_response(request, 400, "client disconnected before the request body was complete")


def create_app(settings: Settings) -> FastAPI:
    """Build the API for ``settings``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state.ttaseg = _app_state(settings)
        yield
        state.checks.shutdown(wait=False)
        state.db.engine.dispose()

    app = FastAPI(
        title="ttaseg",
        version="1",
        summary="Test-time-adapted 3D medical image segmentation.",
        description="Post scans, get segmentations back. See docs/service.md.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    add_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(results.router)
    app.include_router(models.router)
    app.include_router(operations.router)
    app.include_router(dicomweb.router, dependencies=[Depends(authenticate)])
    app.include_router(docs.router)
    app.include_router(web.router)
    app.mount("/ui", web.web_app(settings.web_dist), name="ui")
    app.mount(docs.ASSETS_URL, StaticFiles(directory=docs.ASSETS_DIR), name="docs-assets")
    return app
