"""Operations: liveness, readiness (``service.health``) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import State
from service.errors import sanitise
from service.health import readiness
from service.schemas import Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """Always ``{"status": "ok"}`` while the process serves requests."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: database, storage, broker, a live worker, no job waiting without one",
    responses={503: {"model": Readiness, "description": "Not ready; `checks` says why."}},
)
def readyz(state: State, response: Response) -> Readiness:
    """200 when every check passes; 503 with the reasons and ``Retry-After`` otherwise."""
    ok, results = readiness(
        state.settings, db=state.db, storage=state.storage, celery=state.celery, pool=state.checks
    )
    results = {name: sanitise(text) for name, text in results.items()}
    if not ok:
        response.status_code = 503
        response.headers["Retry-After"] = str(state.settings.retry_after_seconds)
    return Readiness(ok=ok, checks=results)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
def metrics(state: State) -> Response:
    """Job counts, queue depth, live workers, stage durations and request counters."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
