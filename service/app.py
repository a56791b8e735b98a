"""FastAPI application: job submission, status, results, model registry and operations endpoints.

The API never runs models: it streams uploads to storage, validates every scan with the ML core's reader,
writes the job record and sends a Celery task.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from service import jobs as job_ops
from service.auth import Client, KeyRing, load_keys
from service.celery_app import make_celery
from service.config import Settings, get_settings
from service.db import Database, Job, Scan, migrate
from service.deps import AppState, Caller, State, authenticate
from service.health import readiness
from service.metrics import Metrics
from service.schemas import (
    Error,
    JobAccepted,
    JobOptions,
    JobOut,
    JobPage,
    JobState,
    JobSummary,
    ModelOut,
    Readiness,
    ScanOut,
    StudyJobRequest,
    Timings,
    VolumesOut,
)
from service.storage import get_storage
from service.uploads import FILE_FIELD, ApiError, assemble_scans, parse_multipart

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in {
        401: "Missing or invalid credentials.",
        404: "Not found (or owned by another client).",
        409: "Conflict with the job's state.",
        422: "Invalid request.",
    }.items()
}


def _timings(job: Job) -> Timings:
    queued = (job.started_at - job.created_at).total_seconds() if job.started_at else None
    total = (job.finished_at - job.created_at).total_seconds() if job.finished_at else None
    return Timings(
        queued_seconds=queued,
        adapt_seconds=job.adapt_seconds,
        segment_seconds=job.segment_seconds,
        total_seconds=total,
    )


def _scan_links(job: Job, scan: Scan) -> dict[str, str]:
    if scan.state != "succeeded":
        return {}
    base = f"/v1/jobs/{job.id}/scans/{scan.name}"
    links = {
        "segmentation": f"{base}/segmentation?format=nifti",
        "volumes": f"{base}/volumes",
        "overlay": f"{base}/overlay.png",
    }
    if scan.kind == "dicom":
        links["dicom_seg"] = f"{base}/segmentation?format=dicom-seg"
    return links


def job_out(job: Job) -> JobOut:
    """Public view of a job record."""
    return JobOut(
        id=job.id,
        state=job.state,  # type: ignore[arg-type]
        phase=job.phase if job.state == "running" else None,
        progress=job.progress,
        error=job.error if job.state in ("failed", "cancelled") else None,
        model=job.model_ref,
        bundle=f"{job.bundle_name}:{job.bundle_version}",
        bundle_used=job.bundle_used,
        reused_from_job=job.reused_from_job,
        adaptation=job.adaptation,  # type: ignore[arg-type]
        steps=job.steps,
        domain=job.domain,
        source=job.source,  # type: ignore[arg-type]
        study_uid=job.study_uid,
        queue=job.queue,
        device=job.device,
        attempts=job.attempts,
        fallbacks=sum(1 for s in job.scans if s.fallback),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        timings=_timings(job),
        scans=[
            ScanOut(
                name=s.name,
                kind=s.kind,
                state=s.state,  # type: ignore[arg-type]
                input_bytes=s.input_bytes,
                sha256=s.sha256,
                files=s.files,
                size=s.size,
                spacing=s.spacing,
                volumes_ml=s.volumes_ml,
                quality=s.quality,
                fallback=s.fallback,
                fallback_reason=s.fallback_reason,
                seconds=s.seconds,
                links=_scan_links(job, s),
            )
            for s in job.scans
        ],
    )


def _load_job(state: AppState, client: Client, job_id: str) -> Job:
    with state.db.session() as session:
        job = session.get(Job, job_id) if len(job_id) <= 64 else None
        if job is None or job.client_id != client.id:
            raise HTTPException(404, f"job {job_id} not found")
        return job


def _done_scan(state: AppState, client: Client, job_id: str, scan_name: str) -> tuple[Job, Scan]:
    job = _load_job(state, client, job_id)
    scan = next((s for s in job.scans if s.name == scan_name), None)
    if scan is None:
        raise HTTPException(404, f"job {job_id} has no scan {scan_name!r}")
    if scan.state != "succeeded" or not scan.label_key:
        raise HTTPException(409, f"scan {scan_name!r} has no results (job is {job.state})")
    return job, scan


def _bundle_for(state: AppState, model: str) -> Any:
    """Resolve a model reference to a bundle inside the configured bundle root (422 when unknown)."""
    from models.bundle import BundleError, bundles_root, resolve_bundle

    try:
        bundle = resolve_bundle(model, root=state.settings.bundles)
    except BundleError as exc:
        raise HTTPException(422, str(exc)) from None
    root = bundles_root(state.settings.bundles).resolve()
    if not bundle.path.resolve().is_relative_to(root):
        raise HTTPException(422, f"unknown model {model!r}")
    return bundle


def _validate_scans(state: AppState, scans: list[Any]) -> None:
    """Read every scan with the ML core's reader (422 with its reason) and enforce the voxel limit."""
    from models.io import InputError, read_image

    for scan in scans:
        try:
            image = read_image(scan.path)
        except InputError as exc:
            raise ApiError(422, f"scan '{scan.name}': {exc}") from None
        except Exception as exc:
            log.warning("unreadable scan %s: %s", scan.name, exc)
            raise ApiError(422, f"scan '{scan.name}' could not be read: {exc}") from None
        voxels = image.GetNumberOfPixels()
        if voxels > state.settings.max_voxels_per_scan:
            raise ApiError(
                422,
                f"scan '{scan.name}' has {voxels} voxels; the limit is {state.settings.max_voxels_per_scan}",
            )
        scan.shape = [int(n) for n in image.GetSize()]
        scan.spacing = [round(float(s), 6) for s in image.GetSpacing()]


def _study_available(study_uid: str) -> bool:
    """Whether the study was pushed to the STOW-RS endpoint or a PACS is configured to pull it from."""
    if importlib.util.find_spec("service.dicomweb") is None:
        return False
    from service import dicomweb

    if dicomweb.incoming_study_series(study_uid):
        return True
    try:
        dicomweb.client_from_env()
    except dicomweb.DicomWebError:
        return False
    return True


def _options(fields: dict[str, str], max_steps: int) -> JobOptions:
    """Validate job options (form fields or JSON) into a clear 422."""
    try:
        options = JobOptions.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(422, _validation_text(exc.errors())) from None
    if options.steps is not None and options.steps > max_steps:
        raise ApiError(422, f"steps: at most {max_steps}")
    return options


def _validation_text(errors: Any) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "string_pattern_mismatch":
            msg = PATTERN_HINTS.get(loc, msg)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


PATTERN_HINTS = {
    "model": "expected `name` or `name:version` (lowercase letters, digits, '.', '_', '-')",
    "domain": "expected 1-64 letters, digits, '.', '_' or '-'",
    "study_uid": "expected a DICOM UID (digits and dots)",
}
MULTIPART_SCHEMA = {
    "type": "object",
    "required": [FILE_FIELD, "model"],
    "properties": {
        FILE_FIELD: {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Scans: NIfTI/NRRD/MHA files, DICOM files of one series, or zips of DICOM series.",
        },
        **{k: v for k, v in JobOptions.model_json_schema()["properties"].items()},
    },
}
STUDY_SCHEMA = StudyJobRequest.model_json_schema()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for the given (or the environment's) settings."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.resolved_database_url)
        migrate(db.engine)
        keys = KeyRing(load_keys(settings))
        if not len(keys):
            log.warning("no API keys configured: every request will be refused (set TTASEG_API_KEYS)")
        app.state.ttaseg = AppState(
            settings=settings,
            db=db,
            storage=get_storage(settings.resolved_storage_dir),
            keys=keys,
            celery=make_celery(settings),
            metrics=Metrics(db, worker_fresh_seconds=2 * settings.heartbeat_interval + 5),
            checks=ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz"),
        )
        yield
        app.state.ttaseg.checks.shutdown(wait=False)
        db.engine.dispose()

    app = FastAPI(
        title="ttaseg",
        version="1",
        summary="Test-time-adapted 3D medical image segmentation.",
        description="Post scans, get segmentations back. See docs/service.md.",
        lifespan=lifespan,
    )

    @app.exception_handler(ApiError)
    async def _upload_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_text(exc.errors())}, status_code=422)

    @app.exception_handler(ValueError)
    async def _input_error(request: Request, exc: ValueError) -> JSONResponse:
        """InputError and BundleError (ValueErrors with a user-facing message) are the client's: 422."""
        from models.bundle import BundleError
        from models.io import InputError

        if not isinstance(exc, InputError | BundleError):
            raise exc
        log.info("bad input %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": str(exc)}, status_code=422)

    register_routes(app)
    if importlib.util.find_spec("service.dicomweb") is not None:
        from service import dicomweb

        if hasattr(dicomweb, "router"):
            app.include_router(dicomweb.router, tags=["dicomweb"], dependencies=[Depends(authenticate)])
    return app


def _create_job(state: AppState, client: Client, job_id: str, bundle: Any, request: Any, **extra: Any) -> Job:
    """Write the record of a validated job request (``request`` has model, adaptation, steps and domain)."""
    return job_ops.create_job(
        state.db,
        state.storage,
        job_id=job_id,
        client_id=client.id,
        model_ref=request.model,
        bundle_name=bundle.card.name,
        bundle_version=bundle.card.version,
        labels={str(k): v for k, v in bundle.card.labels.items()},
        adaptation=request.adaptation,
        steps=request.steps,
        domain=request.domain,
        queue=state.settings.job_queue,
        **extra,
    )


async def _accept(state: AppState, response: Response, job: Job, scans: list[str]) -> JobAccepted:
    """Enqueue a recorded job and answer 202 with its Location and scan names."""
    await run_in_threadpool(job_ops.enqueue, state.db, state.celery, job.id, job.queue)
    state.metrics.submitted.inc()
    location = f"/v1/jobs/{job.id}"
    response.headers["Location"] = location
    return JobAccepted(id=job.id, state="queued", location=location, scans=scans)


def _reject(state: AppState, status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    state.metrics.rejected.labels(str(status)).inc()
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def register_routes(app: FastAPI) -> None:
    """Attach the v1 and operations routes."""

    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=JobAccepted,
        tags=["jobs"],
        summary="Submit scans (multipart) or a DICOMweb study (JSON) for adaptation and segmentation",
        responses={
            **ERRORS,
            400: {"model": Error, "description": "Malformed body."},
            413: {"model": Error, "description": "Upload too large."},
            415: {"model": Error, "description": "Unsupported content or file type."},
            429: {"model": Error, "description": "Too many queued jobs; see Retry-After."},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                    "application/json": {"schema": STUDY_SCHEMA},
                },
            }
        },
    )
    async def submit_job(request: Request, response: Response, state: State, client: Caller) -> Any:
        settings = state.settings
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_upload_bytes):
            return _reject(state, 413, f"upload larger than the limit of {settings.max_upload_bytes} bytes")
        if settings.max_queued_jobs:
            queued = await run_in_threadpool(job_ops.queued_count, state.db)
            if queued >= settings.max_queued_jobs:
                return _reject(
                    state,
                    429,
                    f"{queued} jobs are waiting; try again later",
                    {"Retry-After": str(settings.retry_after_seconds)},
                )
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        job_id = job_ops.new_job_id()
        if media == "application/json":
            return await _submit_study(request, response, state, client, job_id)
        if media == "application/x-www-form-urlencoded":
            return _reject(
                state, 422, f"no files uploaded: send scans as multipart/form-data, `{FILE_FIELD}`"
            )
        if media != "multipart/form-data":
            return _reject(state, 415, "send multipart/form-data (scans) or application/json (study_uid)")
        staging = state.storage.scratch_dir()
        try:
            form = await parse_multipart(content_type, request.stream(), staging, settings.max_upload_bytes)
            options = _options(form.fields, settings.max_steps)
            bundle = await run_in_threadpool(_bundle_for, state, options.model)
            scans = await run_in_threadpool(assemble_scans, form.files, staging, settings.max_unzipped_bytes)
            if len(scans) > settings.max_scans_per_job:
                raise ApiError(422, f"{len(scans)} scans in one job; at most {settings.max_scans_per_job}")
            await run_in_threadpool(_validate_scans, state, scans)
            job = await run_in_threadpool(_create_job, state, client, job_id, bundle, options, scans=scans)
        except ApiError as exc:
            return _reject(state, exc.status_code, exc.detail)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return await _accept(state, response, job, [scan.name for scan in job.scans])

    async def _submit_study(
        request: Request, response: Response, state: State, client: Client, job_id: str
    ) -> Any:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BYTES:
                return _reject(state, 413, f"JSON body larger than {MAX_JSON_BYTES} bytes")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _reject(state, 400, "body is not valid JSON")
        try:
            study = StudyJobRequest.model_validate(payload)
        except ValidationError as exc:
            return _reject(state, 422, _validation_text(exc.errors()))
        if study.steps is not None and study.steps > state.settings.max_steps:
            return _reject(state, 422, f"steps: at most {state.settings.max_steps}")
        if not await run_in_threadpool(_study_available, study.study_uid):
            return _reject(
                state, 422, "no PACS is configured and this study was not pushed here; upload the scans"
            )
        try:
            bundle = await run_in_threadpool(_bundle_for, state, study.model)
        except HTTPException as exc:
            return _reject(state, exc.status_code, str(exc.detail))
        job = await run_in_threadpool(
            _create_job,
            state,
            client,
            job_id,
            bundle,
            study,
            scans=[],
            source="dicomweb",
            study_uid=study.study_uid,
        )
        return await _accept(state, response, job, [])

    @app.get(
        "/v1/jobs",
        response_model=JobPage,
        tags=["jobs"],
        summary="The caller's jobs, newest first",
        responses=ERRORS,
    )
    def list_jobs(
        state: State,
        client: Caller,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        job_state: Annotated[JobState | None, Query(alias="state")] = None,
    ) -> JobPage:
        with state.db.session() as session:
            query = select(Job).where(Job.client_id == client.id)
            if job_state:
                query = query.where(Job.state == job_state)
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(
                query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
            ).all()
            items = [
                JobSummary(
                    id=j.id,
                    state=j.state,  # type: ignore[arg-type]
                    phase=j.phase if j.state == "running" else None,
                    progress=j.progress,
                    model=j.model_ref,
                    adaptation=j.adaptation,  # type: ignore[arg-type]
                    domain=j.domain,
                    scans=len(j.scans),
                    created_at=j.created_at,
                    finished_at=j.finished_at,
                )
                for j in rows
            ]
        return JobPage(items=items, total=total, limit=limit, offset=offset)

    @app.get(
        "/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"], summary="Status of a job", responses=ERRORS
    )
    def get_job(job_id: str, state: State, client: Caller) -> JobOut:
        return job_out(_load_job(state, client, job_id))

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobOut,
        tags=["jobs"],
        summary="Cancel a queued or running job",
        responses=ERRORS,
    )
    def cancel_job(job_id: str, state: State, client: Caller) -> JobOut:
        job = _load_job(state, client, job_id)
        if not job_ops.cancel(state.db, state.celery, job):
            job = _load_job(state, client, job_id)
            if job.state != "cancelled":
                raise HTTPException(409, f"job already {job.state}")
        return job_out(_load_job(state, client, job_id))

    @app.get(
        "/v1/jobs/{job_id}/scans/{scan}/segmentation",
        tags=["results"],
        summary="Label map of a scan: NIfTI on the input's grid, or DICOM SEG for DICOM input",
        response_class=FileResponse,
        responses={
            **ERRORS,
            200: {
                "content": {"application/gzip": {}, "application/dicom": {}},
                "description": "The segmentation file.",
            },
        },
    )
    def get_segmentation(
        job_id: str,
        scan: str,
        state: State,
        client: Caller,
        fmt: Annotated[str, Query(alias="format", pattern="^(nifti|dicom-seg)$")] = "nifti",
    ) -> FileResponse:
        job, record = _done_scan(state, client, job_id, scan)
        if fmt == "nifti":
            return FileResponse(
                state.storage.local_path(record.label_key),
                media_type="application/gzip",
                filename=f"{record.name}.nii.gz",
            )
        if record.kind != "dicom":
            raise HTTPException(409, f"scan {scan!r} was not DICOM; DICOM SEG needs DICOM input")
        key = f"jobs/{job.id}/dicom-seg/{record.name}.dcm"
        if not state.storage.exists(key):
            if importlib.util.find_spec("service.dicom_seg") is None:
                raise HTTPException(422, "DICOM SEG export is not available on this server")
            from service.dicom_seg import write_dicom_seg

            tmp = state.storage.scratch_dir()
            try:
                out = tmp / "seg.dcm"
                write_dicom_seg(
                    state.storage.local_path(record.label_key),
                    state.storage.local_path(record.input_key),
                    {int(k): v for k, v in job.labels.items()},
                    out,
                )
                state.storage.put_path(key, out, move=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return FileResponse(
            state.storage.local_path(key), media_type="application/dicom", filename=f"{record.name}_seg.dcm"
        )

    @app.get(
        "/v1/jobs/{job_id}/scans/{scan}/volumes",
        response_model=VolumesOut,
        tags=["results"],
        summary="Volume (mL) of every structure of a scan",
        responses=ERRORS,
    )
    def get_volumes(job_id: str, scan: str, state: State, client: Caller) -> VolumesOut:
        job, record = _done_scan(state, client, job_id, scan)
        return VolumesOut(
            job_id=job.id, scan=record.name, volumes_ml=record.volumes_ml or {}, labels=job.labels
        )

    @app.get(
        "/v1/jobs/{job_id}/scans/{scan}/overlay.png",
        tags=["results"],
        summary="PNG preview: a few slices with the label map overlaid",
        response_class=Response,
        responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "PNG image."}},
    )
    def get_overlay(
        job_id: str, scan: str, state: State, client: Caller, slices: Annotated[int, Query(ge=1, le=12)] = 4
    ) -> Response:
        job, record = _done_scan(state, client, job_id, scan)
        key = f"jobs/{job.id}/overlays/{record.name}_{slices}.png"
        if not state.storage.exists(key):
            import SimpleITK as sitk

            from models.io import read_image
            from service.overlay import render_overlay

            image = read_image(state.storage.local_path(record.input_key))
            labels = sitk.ReadImage(str(state.storage.local_path(record.label_key)))
            state.storage.put(key, render_overlay(image, labels, slices))
        return Response(state.storage.get(key), media_type="image/png")

    @app.get(
        "/v1/models",
        response_model=list[ModelOut],
        tags=["models"],
        summary="Bundles in the registry",
        responses=ERRORS,
    )
    def list_models(state: State, client: Caller) -> list[ModelOut]:
        from models.bundle import list_bundles

        return [
            ModelOut(name=b.card.name, version=b.card.version, ref=b.ref, card=b.card.model_dump(mode="json"))
            for b in list_bundles(state.settings.bundles)
        ]

    @app.get("/healthz", tags=["operations"], summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["operations"],
        summary="Readiness: database, storage, broker and a live worker",
        responses={503: {"model": Readiness, "description": "Not ready; `checks` says why."}},
    )
    def readyz(state: State) -> JSONResponse:
        settings = state.settings
        ok, results = readiness(
            settings, db=state.db, storage=state.storage, celery=state.celery, pool=state.checks
        )
        return JSONResponse(
            Readiness(ok=ok, checks=results).model_dump(),
            status_code=200 if ok else 503,
            headers=None if ok else {"Retry-After": str(settings.retry_after_seconds)},
        )

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse)
    def metrics(state: State) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
