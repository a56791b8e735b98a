"""``/v1/jobs``: submit, list, inspect and cancel jobs, and push a job's results to the PACS again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import func, select

from service import jobs as job_ops
from service.api.submission import REQUEST_BODY, accept, submit
from service.db import Job
from service.deps import Caller, State, load_job
from service.errors import ApiError
from service.schemas import ERRORS, SUBMISSION_ERRORS, Error, JobAccepted, JobOut, JobPage
from service.states import JobSource, JobState
from service.views import job_out, job_summary

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
SUBMIT_ROUTE = "submit_job"


@router.post(
    "",
    name=SUBMIT_ROUTE,
    status_code=202,
    response_model=JobAccepted,
    summary="Submit scans (multipart) or a DICOMweb study (JSON) for adaptation and segmentation",
    responses=SUBMISSION_ERRORS,
    openapi_extra=REQUEST_BODY,
)
async def submit_job(request: Request, response: Response, state: State, client: Caller) -> JobAccepted:
    """Validate the whole request, record the job, send it to the queue; 202 with its Location."""
    job = await submit(request, state, client)
    return await accept(state, response, job)


@router.get("", response_model=JobPage, summary="The caller's jobs, newest first", responses=ERRORS)
def list_jobs(
    state: State,
    client: Caller,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    job_state: Annotated[JobState | None, Query(alias="state")] = None,
) -> JobPage:
    """One page of the caller's jobs, optionally of one state."""
    with state.db.session() as session:
        query = select(Job).where(Job.client_id == client.id)
        if job_state:
            query = query.where(Job.state == job_state.value)
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(
            query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
        ).all()
        items = [job_summary(job) for job in rows]
    return JobPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, summary="Status of a job", responses=ERRORS)
def get_job(job_id: str, state: State, client: Caller) -> JobOut:
    """State, progress, per-scan results and links of one of the caller's jobs."""
    return job_out(load_job(state, client, job_id), pacs_viewer_url=state.settings.pacs_viewer_url)


@router.delete("/{job_id}", response_model=JobOut, summary="Cancel a queued or running job", responses=ERRORS)
def cancel_job(job_id: str, state: State, client: Caller) -> JobOut:
    """Cancel a job that is still queued or running (409 once it has ended)."""
    job = load_job(state, client, job_id)
    if not job_ops.cancel(state.db, state.celery, job):
        job = load_job(state, client, job_id)
        if job.state != JobState.CANCELLED:
            raise ApiError(409, f"job already {job.state}")
    return job_out(load_job(state, client, job_id), pacs_viewer_url=state.settings.pacs_viewer_url)


@router.post(
    "/{job_id}/push",
    status_code=202,
    response_model=JobOut,
    summary="Push the results of a succeeded DICOMweb job into its study on the PACS (again)",
    responses={**ERRORS, 503: {"model": Error, "description": "No PACS is configured."}},
)
def push_job(job_id: str, state: State, client: Caller) -> JobOut:
    """Queue a push-back of the job's DICOM SEG and SR (409 unless it is a succeeded DICOMweb job)."""
    job = load_job(state, client, job_id)
    if job.state != JobState.SUCCEEDED or job.source != JobSource.DICOMWEB:
        raise ApiError(
            409, f"only succeeded DICOMweb jobs are pushed (this one is a {job.state} {job.source} job)"
        )
    if not state.settings.dicomweb_url.strip():
        raise ApiError(503, "no PACS is configured for DICOMweb (set TTASEG_DICOMWEB_URL)")
    job_ops.request_push(state.db, state.celery, job)
    return job_out(load_job(state, client, job_id), pacs_viewer_url=state.settings.pacs_viewer_url)
