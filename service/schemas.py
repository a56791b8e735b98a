"""Request and response models of the HTTP API (they define the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.terms import Method, Phase
from service.states import JobSource, JobState, PushState, ScanState

MODEL_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,99}(:[A-Za-z0-9][A-Za-z0-9._+-]{0,63})?$"
DOMAIN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
PATTERN_HINTS = {
    "model": "expected `name` or `name:version` (lowercase letters, digits, '.', '_', '-')",
    "domain": "expected 1-64 letters, digits, '.', '_' or '-'",
    "study_uid": "expected a DICOM UID (digits and dots)",
}


class SegmentationFormat(StrEnum):
    """File format of a downloaded label map."""

    NIFTI = "nifti"
    DICOM_SEG = "dicom-seg"


class JobOptions(BaseModel):
    """Options of a job, shared by uploads (form fields) and DICOMweb pulls (JSON)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_PATTERN, description="Bundle `name` or `name:version`.")
    adaptation: Method = Field(Method.MPL, description="Test-time adaptation method.")
    domain: str | None = Field(
        None,
        pattern=DOMAIN_PATTERN,
        description="Site/scanner key; enables reuse of that domain's adapted bundle.",
    )
    steps: int | None = Field(None, ge=1, description="Adaptation steps (default: the bundle's).")


class StudyJobRequest(JobOptions):
    """A job whose scans are pulled from the configured DICOMweb server."""

    study_uid: str = Field(pattern=UID_PATTERN, max_length=64, description="StudyInstanceUID to retrieve.")


class Error(BaseModel):
    """Error body of every 4xx/5xx answer."""

    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in {
        401: "Missing or invalid credentials.",
        404: "Not found (or owned by another client).",
        409: "Conflict with the job's state.",
        422: "Invalid request.",
    }.items()
}
SUBMISSION_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: {"model": Error, "description": "Malformed body."},
    413: {"model": Error, "description": "Upload too large."},
    415: {"model": Error, "description": "Unsupported content or file type."},
    429: {"model": Error, "description": "Too many queued jobs; see Retry-After."},
}


class ScanOut(BaseModel):
    """Status and results of one scan of a job (read from the scan record's attributes)."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    kind: str = Field(description="nifti, nrrd, mha or dicom")
    state: ScanState
    input_bytes: int
    sha256: str
    files: int
    size: list[int] | None = None
    spacing: list[float] | None = None
    volumes_ml: dict[str, float] | None = None
    quality: dict[str, float] | None = None
    fallback: bool = False
    fallback_reason: str | None = None
    seconds: float | None = None
    links: dict[str, str] = {}


class Timings(BaseModel):
    """Wall-clock seconds of a job's stages."""

    queued_seconds: float | None = None
    adapt_seconds: float | None = None
    segment_seconds: float | None = None
    total_seconds: float | None = None


class PushOut(BaseModel):
    """Push-back of a job's results (DICOM SEG and SR) into its study on the PACS."""

    state: PushState = Field(description="none (nothing to push), pending, pushed or push_failed.")
    error: str | None = Field(None, description="Why the last push failed.")
    attempts: int = Field(0, description="Pushes tried so far.")
    pushed_at: datetime | None = None


class JobOut(BaseModel):
    """A job as its owner sees it."""

    id: str
    state: JobState
    phase: Phase | None = Field(None, description="While running: fetching, adapting or segmenting.")
    progress: float = Field(description="0-100 within the current phase.")
    error: str | None = Field(None, description="Why the job failed.")
    model: str = Field(description="Requested model reference.")
    bundle: str = Field(description="Resolved bundle `name:version`.")
    bundle_used: str | None = Field(None, description="Bundle actually used (base or a domain-adapted one).")
    reused_from_job: str | None = Field(None, description="Job whose adapted bundle was reused.")
    adaptation: Method
    steps: int | None = None
    domain: str | None = None
    source: JobSource
    study_uid: str | None = None
    pacs_viewer: str | None = Field(None, description="The study in the PACS viewer, when one is configured.")
    queue: str
    device: str | None = None
    attempts: int
    fallbacks: int = Field(description="Scans for which the guard fell back to the unadapted model.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timings: Timings
    push: PushOut
    scans: list[ScanOut]


class JobSummary(BaseModel):
    """A job in listings."""

    id: str
    state: JobState
    phase: Phase | None = None
    progress: float
    model: str
    adaptation: Method
    domain: str | None = None
    scans: int
    created_at: datetime
    finished_at: datetime | None = None


class JobPage(BaseModel):
    """One page of the caller's jobs, newest first."""

    items: list[JobSummary]
    total: int
    limit: int
    offset: int


class JobAccepted(BaseModel):
    """Answer to a job submission."""

    id: str
    state: JobState
    location: str
    scans: list[str]


class ModelOut(BaseModel):
    """A bundle in the registry."""

    name: str
    version: str
    ref: str
    card: dict[str, Any]


class VolumesOut(BaseModel):
    """Volumes per structure of one scan."""

    job_id: str
    scan: str
    volumes_ml: dict[str, float]
    labels: dict[str, str] = Field(description="Label value -> structure name.")


class Readiness(BaseModel):
    """Readiness checks; `ok` is true only when all pass."""

    ok: bool
    checks: dict[str, str]
