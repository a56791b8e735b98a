"""STOW-RS receiver: a PACS (or any client) pushes studies, which then belong to the pushing client."""

from __future__ import annotations

import logging
import shutil

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydicom import Dataset
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service import dicomweb
from service.auth import Client
from service.db import IncomingStudy
from service.deps import AppState, Caller, State
from service.errors import ApiError
from service.multipart import read_parts
from service.states import IncomingState

log = logging.getLogger(__name__)
router = APIRouter(tags=["dicomweb"])


@router.post("/dicomweb/studies", summary="Receive instances pushed by a PACS (STOW-RS)")
async def stow_studies(request: Request, state: State, client: Caller) -> JSONResponse:
    """Store the pushed instances; answers the PS3.18 Store Instances response (application/dicom+json).

    The body is streamed part by part to scratch files. 200: all stored; 202: some failed
    (FailedSOPSequence); 409: none stored; 400/413/415: bad request body.
    """
    try:
        answer, count = await _receive(request, state, client)
    except ApiError as exc:
        log.info("STOW-RS request of %s refused (%d): %s", client.id, exc.status_code, exc.detail)
        raise
    failed = len(answer.get("FailedSOPSequence") or [])
    status = 200 if not failed else 409 if failed == count else 202
    return JSONResponse(answer.to_json_dict(), status_code=status, media_type="application/dicom+json")


async def _receive(request: Request, state: AppState, client: Client) -> tuple[Dataset, int]:
    """Stream the body's parts to a scratch folder, then store them; the answer and the number of parts."""
    settings = state.settings
    content_type = request.headers.get("content-type", "")
    dicomweb.check_stow_type(content_type)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > settings.max_upload_bytes):
        raise ApiError(413, f"STOW-RS request larger than the limit of {settings.max_upload_bytes} bytes")
    staging = state.storage.scratch_dir()
    try:
        parts = await read_parts(
            content_type,
            request.stream(),
            staging,
            max_bytes=settings.max_upload_bytes,
            start=dicomweb.spool_stow_part,
            what="STOW-RS request",
        )
        answer = await run_in_threadpool(
            dicomweb.store_parts, parts, settings.resolved_storage_dir, client.id
        )
    finally:
        await run_in_threadpool(shutil.rmtree, staging, True)
    return answer, len(parts)


@router.get("/dicomweb/studies/{study_uid}", summary="Series and instances the caller pushed for a study")
def incoming_study_status(study_uid: str, state: State, client: Caller) -> dict:
    """The caller's received series of a study with their instance counts, and what the automatic start did
    with it; 404 when it pushed none."""
    try:
        folders = dicomweb.incoming_study_series(state.settings.resolved_storage_dir, client.id, study_uid)
    except ValueError:
        raise ApiError(400, "not a valid StudyInstanceUID") from None
    if not folders:
        raise ApiError(404, f"no instances received for study {study_uid}")
    series = [{"series_instance_uid": f.name, "instances": len(list(f.glob("*.dcm")))} for f in folders]
    return {
        "study_instance_uid": study_uid,
        "series": series,
        "instances": sum(s["instances"] for s in series),
        "start": _start_status(state, client, study_uid),
    }


def _start_status(state: AppState, client: Client, study_uid: str) -> dict:
    """What the automatic start did with the study: manual, waiting, started (with the job) or unrouted."""
    with state.db.session() as session:
        row = session.scalar(
            select(IncomingStudy).where(
                IncomingStudy.client_id == client.id, IncomingStudy.study_uid == study_uid
            )
        )
    if row is not None:
        return {"state": row.state, "job_id": row.job_id, "reason": row.reason}
    waiting = IncomingState.WAITING if state.settings.routing_rules else IncomingState.MANUAL
    return {"state": waiting, "job_id": None, "reason": None}
