"""Request dependencies shared by the routers: the app's resources and the calling client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.auth import Client, KeyRing
from service.config import Settings
from service.db import Database, Job, Scan
from service.errors import ApiError, short
from service.metrics import Metrics
from service.states import ScanState
from service.storage import Storage

MAX_JOB_ID = 64


@dataclass
class AppState:
    """Process-wide resources of the API, built once by the app's lifespan."""

    settings: Settings
    db: Database
    storage: Storage
    keys: KeyRing
    celery: Celery
    metrics: Metrics
    checks: ThreadPoolExecutor


def _state(request: Request) -> AppState:
    return request.app.state.ttaseg


State = Annotated[AppState, Depends(_state)]
_bearer = HTTPBearer(auto_error=False, description="API token as `Authorization: Bearer <token>`.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="API token in `X-API-Key`.")


def authenticate(
    state: State,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Client:
    """The calling client, from a Bearer token or an X-API-Key header (401 otherwise)."""
    token = bearer.credentials if bearer is not None else api_key
    client = state.keys.authenticate(token) if token else None
    if client is None:
        raise ApiError(
            401,
            "missing or invalid API key"
            if token
            else "missing credentials: send `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return client


Caller = Annotated[Client, Depends(authenticate)]


def load_job(state: AppState, client: Client, job_id: str) -> Job:
    """The caller's job ``job_id`` with its scans (404 when absent or another client's)."""
    with state.db.session() as session:
        job = session.get(Job, job_id) if len(job_id) <= MAX_JOB_ID else None
        if job is None or job.client_id != client.id:
            raise ApiError(404, f"job {short(job_id)} not found")
        return job


def load_scan(state: AppState, client: Client, job_id: str, scan_name: str) -> tuple[Job, Scan]:
    """The caller's job and its scan ``scan_name`` (404 when either is absent or the job is another client's)."""
    job = load_job(state, client, job_id)
    scan = next((s for s in job.scans if s.name == scan_name), None)
    if scan is None:
        raise ApiError(404, f"job {job.id} has no scan {short(scan_name)!r}")
    return job, scan


def require_results(job: Job, scan: Scan) -> None:
    """409 while the scan has no results (the job has not succeeded for it yet)."""
    if scan.state != ScanState.SUCCEEDED or not scan.label_key or not scan.result_json_key:
        raise ApiError(409, f"scan {scan.name!r} has no results (job is {job.state})")


def finished_scan(state: AppState, client: Client, job_id: str, scan_name: str) -> tuple[Job, Scan]:
    """The caller's job and its scan ``scan_name`` (404 when absent, 409 while it has no results)."""
    job, scan = load_scan(state, client, job_id, scan_name)
    require_results(job, scan)
    return job, scan
