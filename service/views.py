"""Public views of job records: what the API shows a job's owner."""

from __future__ import annotations

from models.terms import Method, Phase
from service.db import Job, Scan
from service.schemas import JobOut, JobSummary, PushOut, ScanOut, SegmentationFormat, Timings
from service.states import JobSource, JobState, PushState, ScanState


def _phase(job: Job) -> Phase | None:
    """The phase of a running job (None otherwise, or when the worker wrote an unknown one)."""
    if job.state != JobState.RUNNING or job.phase not in set(Phase):
        return None
    return Phase(job.phase)


def _timings(job: Job) -> Timings:
    queued = (job.started_at - job.created_at).total_seconds() if job.started_at else None
    total = (job.finished_at - job.created_at).total_seconds() if job.finished_at else None
    return Timings(
        queued_seconds=queued,
        adapt_seconds=job.adapt_seconds,
        segment_seconds=job.segment_seconds,
        total_seconds=total,
    )


def scan_links(job: Job, scan: Scan) -> dict[str, str]:
    """Result URLs of a scan (none until it succeeded)."""
    if scan.state != ScanState.SUCCEEDED:
        return {}
    base = f"/v1/jobs/{job.id}/scans/{scan.name}"
    links = {
        "segmentation": f"{base}/segmentation?format={SegmentationFormat.NIFTI}",
        "volumes": f"{base}/volumes",
        "overlay": f"{base}/overlay.png",
        "uncertainty": f"{base}/uncertainty",
    }
    if job.adaptation != Method.NONE:
        links["source_segmentation"] = f"{base}/source-segmentation"
    if scan.kind == "dicom":
        links["dicom_seg"] = f"{base}/segmentation?format={SegmentationFormat.DICOM_SEG}"
    return links


def scan_out(job: Job, scan: Scan) -> ScanOut:
    """Public view of one scan of a job."""
    out = ScanOut.model_validate(scan)
    out.links = scan_links(job, scan)
    return out


def job_out(job: Job, *, pacs_viewer_url: str = "") -> JobOut:
    """Public view of a job record; ``pacs_viewer_url`` (with ``{study_uid}``) links a PACS study's job to it."""
    state = JobState(job.state)
    viewer = (
        pacs_viewer_url.replace("{study_uid}", job.study_uid) if pacs_viewer_url and job.study_uid else None
    )
    return JobOut(
        id=job.id,
        state=state,
        phase=_phase(job),
        progress=job.progress,
        error=job.error if state in (JobState.FAILED, JobState.CANCELLED) else None,
        model=job.model_ref,
        bundle=f"{job.bundle_name}:{job.bundle_version}",
        bundle_used=job.bundle_used,
        reused_from_job=job.reused_from_job,
        adaptation=Method(job.adaptation),
        steps=job.steps,
        domain=job.domain,
        source=JobSource(job.source),
        study_uid=job.study_uid,
        pacs_viewer=viewer,
        queue=job.queue,
        device=job.device,
        attempts=job.attempts,
        fallbacks=sum(1 for s in job.scans if s.fallback),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        timings=_timings(job),
        push=PushOut(
            state=PushState(job.push_state or PushState.NONE),
            error=job.push_error,
            attempts=job.push_attempts or 0,
            pushed_at=job.pushed_at,
        ),
        scans=[scan_out(job, s) for s in job.scans],
    )


def job_summary(job: Job) -> JobSummary:
    """A job as listed."""
    return JobSummary(
        id=job.id,
        state=JobState(job.state),
        phase=_phase(job),
        progress=job.progress,
        model=job.model_ref,
        adaptation=Method(job.adaptation),
        domain=job.domain,
        scans=len(job.scans),
        created_at=job.created_at,
        finished_at=job.finished_at,
    )
