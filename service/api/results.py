"""``/v1/jobs/{job_id}/scans/{scan}/...``: label maps (NIfTI or DICOM SEG), volumes and PNG previews."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import SimpleITK as sitk
from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse

from models.io import read_image
from service.db import Job, Scan
from service.deps import AppState, Caller, State, finished_scan
from service.dicom_seg import write_dicom_seg
from service.errors import ApiError
from service.overlay import render_overlay
from service.schemas import ERRORS, SegmentationFormat, VolumesOut

router = APIRouter(prefix="/v1/jobs/{job_id}/scans/{scan}", tags=["results"])
SEGMENTATION_FILES = {
    200: {
        "content": {"application/gzip": {}, "application/dicom": {}},
        "description": "The segmentation file.",
    }
}


def dicom_seg_path(state: AppState, job: Job, scan: Scan) -> Path:
    """The scan's DICOM SEG, written on first request from its label map and input series."""
    if scan.kind != "dicom":
        raise ApiError(409, f"scan {scan.name!r} was not DICOM; DICOM SEG needs DICOM input")
    key = f"jobs/{job.id}/dicom-seg/{scan.name}.dcm"
    if not state.storage.exists(key):
        tmp = state.storage.scratch_dir()
        try:
            out = tmp / "seg.dcm"
            write_dicom_seg(
                state.storage.local_path(scan.label_key),
                state.storage.local_path(scan.input_key),
                {int(k): v for k, v in job.labels.items()},
                out,
            )
            state.storage.put_path(key, out, move=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return state.storage.local_path(key)


@router.get(
    "/segmentation",
    summary="Label map of a scan: NIfTI on the input's grid, or DICOM SEG for DICOM input",
    response_class=FileResponse,
    responses={**ERRORS, **SEGMENTATION_FILES},
)
def get_segmentation(
    job_id: str,
    scan: str,
    state: State,
    client: Caller,
    fmt: Annotated[SegmentationFormat, Query(alias="format")] = SegmentationFormat.NIFTI,
) -> FileResponse:
    """The label map as ``.nii.gz`` or, for DICOM input, as a DICOM SEG referencing the input series."""
    job, record = finished_scan(state, client, job_id, scan)
    if fmt is SegmentationFormat.NIFTI:
        return FileResponse(
            state.storage.local_path(record.label_key),
            media_type="application/gzip",
            filename=f"{record.name}.nii.gz",
        )
    return FileResponse(
        dicom_seg_path(state, job, record), media_type="application/dicom", filename=f"{record.name}_seg.dcm"
    )


@router.get(
    "/volumes",
    response_model=VolumesOut,
    summary="Volume (mL) of every structure of a scan",
    responses=ERRORS,
)
def get_volumes(job_id: str, scan: str, state: State, client: Caller) -> VolumesOut:
    """Volume per structure and the label names."""
    job, record = finished_scan(state, client, job_id, scan)
    return VolumesOut(job_id=job.id, scan=record.name, volumes_ml=record.volumes_ml or {}, labels=job.labels)


@router.get(
    "/overlay.png",
    summary="PNG preview: a few slices with the label map overlaid",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "PNG image."}},
)
def get_overlay(
    job_id: str, scan: str, state: State, client: Caller, slices: Annotated[int, Query(ge=1, le=12)] = 4
) -> Response:
    """A few slices of the scan with its label map blended on top (rendered once per slice count)."""
    job, record = finished_scan(state, client, job_id, scan)
    key = f"jobs/{job.id}/overlays/{record.name}_{slices}.png"
    if not state.storage.exists(key):
        image = read_image(state.storage.local_path(record.input_key))
        labels = sitk.ReadImage(str(state.storage.local_path(record.label_key)))
        state.storage.put(key, render_overlay(image, labels, slices))
    return Response(state.storage.get(key), media_type="image/png")
