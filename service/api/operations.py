"""Operations: liveness, readiness (database, storage, broker, a live worker) and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select

from service.db import Worker, utcnow
from service.deps import AppState, State
from service.errors import sanitise
from service.schemas import Readiness

router = APIRouter(tags=["operations"])
CHECK_TIMEOUT = 5.0


def readiness_checks(state: AppState) -> dict[str, Callable[[], object]]:
    """Named checks that raise when a dependency of the service is unusable."""
    settings = state.settings

    def worker() -> None:
        fresh = utcnow() - timedelta(seconds=2 * settings.heartbeat_interval + 5)
        with state.db.session() as session:
            rows = session.scalars(select(Worker.queues).where(Worker.last_seen >= fresh)).all()
        if not any(settings.job_queue in q.split(",") for q in rows):
            raise RuntimeError(f"no live worker consumes queue {settings.job_queue!r}")

    def broker() -> None:
        with state.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    return {"database": state.db.ping, "storage": state.storage.probe, "broker": broker, "worker": worker}


def run_checks(state: AppState) -> dict[str, str]:
    """Run the readiness checks in parallel: ``ok``, ``timed out`` or ``failed: <reason>`` for each."""
    futures = {name: state.checks.submit(check) for name, check in readiness_checks(state).items()}
    results: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=CHECK_TIMEOUT)
            results[name] = "ok"
        except FutureTimeout:
            results[name] = "timed out"
        except Exception as exc:
            results[name] = sanitise(f"failed: {exc}")
    return results


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """Always ``{"status": "ok"}`` while the process serves requests."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: database, storage, broker and a live worker",
    responses={503: {"model": Readiness, "description": "Not ready; `checks` says why."}},
)
def readyz(state: State, response: Response) -> Readiness:
    """200 when every check passes; 503 with the reasons and ``Retry-After`` otherwise."""
    results = run_checks(state)
    ok = all(v == "ok" for v in results.values())
    if not ok:
        response.status_code = 503
        response.headers["Retry-After"] = str(state.settings.retry_after_seconds)
    return Readiness(ok=ok, checks=results)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
def metrics(state: State) -> Response:
    """Job counts, queue depth, live workers, stage durations and request counters."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
