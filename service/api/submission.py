"""Job submission: admission checks, uploaded scans (multipart) or a DICOMweb study (JSON), the job record.

Every refusal is an :class:`ApiError`; nothing is stored until the whole request was validated.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from models.bundle import Bundle, BundleError, bundles_root, resolve_bundle
from service import dicomweb
from service import jobs as job_ops
from service.auth import Client
from service.config import Settings
from service.deps import AppState
from service.errors import ApiError, sanitise, short, validation_text
from service.multipart import FILE_FIELD, UploadedFile, parse_multipart
from service.schemas import PATTERN_HINTS, JobAccepted, JobOptions, StudyJobRequest
from service.states import JobSource, JobState
from service.uploads import StagedScan, assemble_scans
from service.validation import validate_scan

MAX_JSON_BYTES = 64 * 1024
Options = TypeVar("Options", bound=JobOptions)


def inline_schema(model: type[JobOptions]) -> dict[str, Any]:
    """JSON schema of ``model`` with its ``$defs`` (e.g. enums) inlined, for an OpenAPI request body."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(
                    {**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}}
                )
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [FILE_FIELD, "model"],
    "properties": {
        FILE_FIELD: {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Scans: NIfTI/NRRD/MHA files, DICOM files of one series, or zips of DICOM series.",
        },
        **inline_schema(JobOptions)["properties"],
    },
}
REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": MULTIPART_SCHEMA},
            "application/json": {"schema": inline_schema(StudyJobRequest)},
        },
    }
}


async def admit(request: Request, state: AppState) -> None:
    """Refuse a submission early: declared body above the upload limit (413), or a full queue (429)."""
    settings = state.settings
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ApiError(400, "Content-Length is not a number")
    if length is not None and int(length) > settings.max_upload_bytes:
        raise ApiError(413, f"upload larger than the limit of {settings.max_upload_bytes} bytes")
    if settings.max_queued_jobs:
        queued = await run_in_threadpool(job_ops.queued_count, state.db)
        if queued >= settings.max_queued_jobs:
            raise ApiError(
                429,
                f"{queued} jobs are waiting; try again later",
                {"Retry-After": str(settings.retry_after_seconds)},
            )


def parse_options(model: type[Options], data: Any, max_steps: int) -> Options:
    """Validate job options (form fields or JSON) into ``model``; 422 with a short reason."""
    try:
        options = model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, validation_text(exc.errors(), PATTERN_HINTS)) from None
    if options.steps is not None and options.steps > max_steps:
        raise ApiError(422, f"steps: at most {max_steps}")
    return options


def resolve_model(bundles: Path | None, model: str) -> Bundle:
    """The bundle a model reference names, inside the configured bundle root (422 when unknown)."""
    try:
        bundle = resolve_bundle(model, root=bundles)
    except BundleError as exc:
        raise ApiError(422, sanitise(str(exc))) from None
    if not bundle.path.resolve().is_relative_to(bundles_root(bundles).resolve()):
        raise ApiError(422, f"unknown model {short(model)!r}")
    return bundle


def stage_scans(files: list[UploadedFile], staging: Path, settings: Settings) -> list[StagedScan]:
    """Group uploads into scans and read each one (422 on the first bad scan or too many scans)."""
    scans = assemble_scans(files, staging, settings.max_unzipped_bytes)
    if len(scans) > settings.max_scans_per_job:
        raise ApiError(422, f"{len(scans)} scans in one job; at most {settings.max_scans_per_job}")
    for scan in scans:
        scan.shape, scan.spacing = validate_scan(scan.path, settings.max_voxels_per_scan, name=scan.name)
    return scans


def study_available(settings: Settings, client: Client, study_uid: str) -> bool:
    """Whether this client pushed the study to the STOW-RS endpoint, or a PACS is configured to pull it from."""
    if dicomweb.incoming_study_series(settings.resolved_storage_dir, client.id, study_uid):
        return True
    return bool(settings.dicomweb_url.strip())


@dataclass(frozen=True)
class Recorded:
    """A job just written: its id, queue and scan names."""

    id: str
    queue: str
    scans: list[str]


def record_job(
    state: AppState,
    client: Client,
    bundle: Bundle,
    options: JobOptions,
    *,
    scans: list[StagedScan],
    **extra: Any,
) -> Recorded:
    """Write the queued record of a validated request (moving its staged scans into storage)."""
    record = job_ops.job_record(
        job_id=job_ops.new_job_id(),
        client_id=client.id,
        model_ref=options.model,
        bundle_name=bundle.card.name,
        bundle_version=bundle.card.version,
        labels={str(k): v for k, v in bundle.card.labels.items()},
        adaptation=options.adaptation.value,
        steps=options.steps,
        domain=options.domain,
        queue=state.settings.job_queue,
        **extra,
    )
    job = job_ops.create_job(state.db, state.storage, record, scans)
    return Recorded(job.id, job.queue, [scan.name for scan in scans])


async def submit_upload(request: Request, state: AppState, client: Client, content_type: str) -> Recorded:
    """A job from a multipart upload: stream to staging, validate options, model and every scan, record."""
    settings = state.settings
    staging = state.storage.scratch_dir()
    try:
        form = await parse_multipart(content_type, request.stream(), staging, settings.max_upload_bytes)
        options = parse_options(JobOptions, form.fields, settings.max_steps)
        bundle = await run_in_threadpool(resolve_model, settings.bundles, options.model)
        scans = await run_in_threadpool(stage_scans, form.files, staging, settings)
        return await run_in_threadpool(record_job, state, client, bundle, options, scans=scans)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


async def _json_body(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_JSON_BYTES:
            raise ApiError(413, f"JSON body larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "body is not valid JSON") from None


async def submit_study(request: Request, state: AppState, client: Client) -> Recorded:
    """A job whose scans a worker pulls from the PACS (or from instances pushed to the STOW-RS endpoint)."""
    study = parse_options(StudyJobRequest, await _json_body(request), state.settings.max_steps)
    if not await run_in_threadpool(study_available, state.settings, client, study.study_uid):
        raise ApiError(422, "no PACS is configured and this study was not pushed here; upload the scans")
    bundle = await run_in_threadpool(resolve_model, state.settings.bundles, study.model)
    return await run_in_threadpool(
        record_job,
        state,
        client,
        bundle,
        study,
        scans=[],
        source=JobSource.DICOMWEB.value,
        study_uid=study.study_uid,
    )


async def submit(request: Request, state: AppState, client: Client) -> Recorded:
    """Admit a submission and dispatch it on its content type (multipart upload or JSON study)."""
    await admit(request, state)
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "application/json":
        return await submit_study(request, state, client)
    if media == "application/x-www-form-urlencoded":
        raise ApiError(422, f"no files uploaded: send scans as multipart/form-data, `{FILE_FIELD}`")
    if media != "multipart/form-data":
        raise ApiError(415, "send multipart/form-data (scans) or application/json (study_uid)")
    return await submit_upload(request, state, client, content_type)


async def accept(state: AppState, response: Response, job: Recorded) -> JobAccepted:
    """Enqueue a recorded job and answer 202 with its Location and scan names."""
    await run_in_threadpool(job_ops.enqueue, state.db, state.celery, job.id, job.queue)
    state.metrics.submitted.inc()
    location = f"/v1/jobs/{job.id}"
    response.headers["Location"] = location
    return JobAccepted(id=job.id, state=JobState.QUEUED, location=location, scans=job.scans)
