"""Results for viewing a scan in a browser: the input scan as NIfTI and the scan's result record.

Both answer only the job's owner (404 for anyone else), like the other result routes.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from models.io import read_image, write_image
from service.deps import Caller, State, load_scan
from service.errors import ApiError
from service.schemas import Error
from service.states import ScanState

router = APIRouter(tags=["results"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "Missing or invalid credentials."},
    404: {"model": Error, "description": "Not found (or owned by another client)."},
    409: {"model": Error, "description": "The scan has no results yet."},
}
# server-side paths in the pipeline's record, never shown to a client
PRIVATE_FIELDS = ("label_path", "json_path")


@router.get(
    "/v1/jobs/{job_id}/scans/{scan}/image",
    summary="The input scan as NIfTI (converted once for NRRD, MHA and DICOM input), for viewers",
    response_class=FileResponse,
    responses={
        **ERRORS,
        200: {"content": {"application/gzip": {}, "application/octet-stream": {}}, "description": "NIfTI."},
    },
)
def get_image(job_id: str, scan: str, state: State, client: Caller) -> FileResponse:
    job, record = load_scan(state, client, job_id, scan)
    if not record.input_key or not state.storage.exists(record.input_key):
        raise ApiError(409, f"scan {scan!r} has no stored input yet")
    if record.kind == "nifti":
        path = state.storage.local_path(record.input_key)
        gzipped = path.name.endswith(".gz")
        return FileResponse(
            path,
            media_type="application/gzip" if gzipped else "application/octet-stream",
            filename=f"{record.name}.nii.gz" if gzipped else f"{record.name}.nii",
        )
    key = f"jobs/{job.id}/viewer/{record.name}.nii.gz"
    if not state.storage.exists(key):
        image = read_image(state.storage.local_path(record.input_key))
        tmp = state.storage.scratch_dir()
        try:
            state.storage.put_path(key, write_image(image, tmp / "image.nii.gz"), move=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return FileResponse(
        state.storage.local_path(key), media_type="application/gzip", filename=f"{record.name}.nii.gz"
    )


@router.get(
    "/v1/jobs/{job_id}/scans/{scan}/report",
    summary="The scan's result record: volumes, quality signals, guard decision, adaptation steps and seconds",
    response_model=dict[str, Any],
    responses=ERRORS,
)
def get_report(job_id: str, scan: str, state: State, client: Caller) -> dict[str, Any]:
    job, record = load_scan(state, client, job_id, scan)
    if record.state != ScanState.SUCCEEDED or not record.result_json_key:
        raise ApiError(409, f"scan {scan!r} has no results (job is {job.state})")
    report = json.loads(state.storage.get(record.result_json_key))
    return {k: v for k, v in report.items() if k not in PRIVATE_FIELDS}
