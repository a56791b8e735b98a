"""Results for viewing a scan in a browser: the input scan as NIfTI, the scan's result record, the source
model's label map and the voxel-wise uncertainty.

All answer only the job's owner (404 for anyone else), like the other result routes.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from models.io import read_image, write_image
from models.terms import Method
from service.db import Job, Scan
from service.deps import AppState, Caller, State, finished_scan, load_scan, require_results
from service.errors import ApiError
from service.schemas import Error

router = APIRouter(tags=["results"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "Missing or invalid credentials."},
    404: {"model": Error, "description": "Not found (or owned by another client)."},
    409: {"model": Error, "description": "The scan has no results yet."},
}
NIFTI_GZ: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/gzip": {}}, "description": "NIfTI (.nii.gz) on the input scan's grid."}
}
# server-side file names in the pipeline's record, never shown to a client
PRIVATE_FIELDS = ("label_path", "json_path", "source_label_file", "uncertainty_file")


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
    job, record = finished_scan(state, client, job_id, scan)
    report = _record(state, record)
    return {k: v for k, v in report.items() if k not in PRIVATE_FIELDS}


def _record(state: AppState, scan: Scan) -> dict[str, Any]:
    """The pipeline's record of a finished scan."""
    return json.loads(state.storage.get(scan.result_json_key))


def _result_file(state: AppState, job: Job, scan: Scan, field: str, suffix: str) -> FileResponse:
    """The file the scan's record names in ``field``, stored beside its label map (409 when it has none)."""
    require_results(job, scan)
    name = _record(state, scan).get(field)
    key = f"{scan.label_key.rsplit('/', 1)[0]}/{name}" if isinstance(name, str) and "/" not in name else None
    if key is None or not state.storage.exists(key):
        raise ApiError(409, f"scan {scan.name!r} has no {suffix} map")
    return FileResponse(
        state.storage.local_path(key), media_type="application/gzip", filename=f"{scan.name}_{suffix}.nii.gz"
    )


@router.get(
    "/v1/jobs/{job_id}/scans/{scan}/source-segmentation",
    summary="The source (unadapted) model's label map of a scan, NIfTI on the input grid, for comparison",
    response_class=FileResponse,
    responses={
        **ERRORS,
        **NIFTI_GZ,
        409: {"model": Error, "description": "A `none` job (no adaptation), or the scan has no results yet."},
    },
)
def get_source_segmentation(job_id: str, scan: str, state: State, client: Caller) -> FileResponse:
    """What the model as trained predicted; 409 for ``none`` jobs, whose label map is the source model's."""
    job, record = load_scan(state, client, job_id, scan)
    if job.adaptation == Method.NONE:
        raise ApiError(409, f"job {job.id} did not adapt: its label map is the source model's")
    return _result_file(state, job, record, "source_label_file", "source")


@router.get(
    "/v1/jobs/{job_id}/scans/{scan}/uncertainty",
    summary="Voxel-wise uncertainty of a scan's label map (normalised entropy, 0-1), NIfTI on the input grid",
    response_class=FileResponse,
    responses={
        **ERRORS,
        **NIFTI_GZ,
        409: {"model": Error, "description": "The scan has no results yet, or no uncertainty map."},
    },
)
def get_uncertainty(job_id: str, scan: str, state: State, client: Caller) -> FileResponse:
    """Entropy of the class probabilities behind the label map, 0 (certain) to 1 (uniform), as float32."""
    job, record = load_scan(state, client, job_id, scan)
    return _result_file(state, job, record, "uncertainty_file", "uncertainty")
