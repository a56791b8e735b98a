"""Push-back of a succeeded DICOMweb job's results into its study on the PACS.

Three steps, each its own function: :func:`write_seg` (DICOM SEG of a scan), :func:`write_sr` (TID 1500
measurement report of the scan) and :func:`push` (STOW-RS with retries). Their SOP Instance and Series
Instance UIDs derive from the job, the scan and the kind of object, so pushing again replaces the earlier
copies instead of adding new ones. The outcome is recorded on the job (``push_state``, ``push_error``,
``pushed_at``); a failed push never changes the job's own state.
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import timedelta
from pathlib import Path

from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from service import dicomweb
from service.db import Database, Job, Scan, utcnow
from service.dicom_seg import write_dicom_seg
from service.dicom_sr import write_measurement_report
from service.jobs import send_push
from service.states import JobSource, JobState, PushState, ScanState
from workers.context import Context, get_context

log = logging.getLogger(__name__)

PUSH_TRIES = 3  # whole STOW-RS requests tried when the PACS is unreachable or answers 5xx ...
PUSH_BACKOFF_S = 1.0  # ... after 1 s, then 2 s (the DICOMweb client retries single requests on top)
MAX_ERROR_CHARS = 300


def object_uids(job_id: str, scan: str, kind: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the ``kind`` ("seg" or "sr") object of a job's scan."""
    return (
        generate_uid(entropy_srcs=[job_id, scan, kind, "series"]),
        generate_uid(entropy_srcs=[job_id, scan, kind]),
    )


def wants_push(job: Job, dicomweb_url: str) -> bool:
    """Whether the job's results go back to the PACS: a DICOMweb job, with a PACS configured."""
    return job.source == JobSource.DICOMWEB and bool(dicomweb_url.strip())


def write_seg(ctx: Context, job: Job, scan: Scan, out_dir: Path) -> Path:
    """The scan's DICOM SEG with the job's label names and fixed UIDs."""
    series_uid, sop_uid = object_uids(job.id, scan.name, "seg")
    return write_dicom_seg(
        ctx.storage.local_path(scan.label_key),
        ctx.storage.local_path(scan.input_key),
        {int(k): v for k, v in job.labels.items()},
        out_dir / f"{scan.name}_seg.dcm",
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )


def write_sr(ctx: Context, job: Job, scan: Scan, seg_path: Path, out_dir: Path) -> Path:
    """The scan's measurement report (volumes, quality signals, guard decision) with fixed UIDs."""
    series_uid, sop_uid = object_uids(job.id, scan.name, "sr")
    return write_measurement_report(
        seg_path,
        ctx.storage.local_path(scan.input_key),
        scan.volumes_ml or {},
        scan.quality or {},
        scan.fallback,
        scan.fallback_reason,
        out_dir / f"{scan.name}_sr.dcm",
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )


def push(paths: list[Path], client: DICOMwebClient) -> None:
    """Store ``paths`` with STOW-RS, trying again with backoff while the PACS is unreachable or fails (5xx)."""
    for attempt in range(1, PUSH_TRIES + 1):
        try:
            dicomweb.push_instances(paths, client)
            return
        except dicomweb.DicomWebError as exc:
            transient = exc.status_code == 503 or (exc.pacs_status or 0) >= 500
            if not transient or attempt == PUSH_TRIES:
                raise
            log.info("push to the PACS failed (%s); trying again", exc)
            time.sleep(PUSH_BACKOFF_S * 2 ** (attempt - 1))


def _record(db: Database, job_id: str, **values: object) -> None:
    with db.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def push_job(ctx: Context, job_id: str) -> PushState:
    """Write and push the SEG and SR of every succeeded DICOM scan of a job; records and returns the outcome.

    Jobs that are not succeeded DICOMweb jobs, or without a configured PACS, are left alone (``none``).
    """
    with ctx.db.session() as session:
        job = session.get(Job, job_id)
    if job is None or job.state != JobState.SUCCEEDED or not wants_push(job, ctx.settings.dicomweb_url):
        return PushState.NONE
    _record(ctx.db, job_id, push_state=PushState.PENDING, push_attempts=Job.push_attempts + 1)
    scratch = ctx.storage.scratch_dir()
    try:
        paths: list[Path] = []
        for scan in job.scans:
            if scan.state != ScanState.SUCCEEDED or scan.kind != "dicom" or not scan.label_key:
                continue
            seg = write_seg(ctx, job, scan, scratch)
            paths += [seg, write_sr(ctx, job, scan, seg, scratch)]
        push(paths, dicomweb.pacs_client(ctx.settings))
    except Exception as exc:
        reason = str(exc) if isinstance(exc, dicomweb.DicomWebError) else f"{type(exc).__name__}: {exc}"
        log.warning("results of job %s not pushed to the PACS: %s", job_id, reason)
        _record(ctx.db, job_id, push_state=PushState.PUSH_FAILED, push_error=reason[:MAX_ERROR_CHARS])
        return PushState.PUSH_FAILED
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("results of job %s pushed to the PACS (%d instances)", job_id, len(paths))
    _record(ctx.db, job_id, push_state=PushState.PUSHED, push_error=None, pushed_at=utcnow())
    return PushState.PUSHED


def run_push(job_id: str) -> None:
    """Celery entry point of a push requested by the API or the recovery loop."""
    push_job(get_context(), job_id)


def retry_pushes(ctx: Context) -> list[str]:
    """Send pushes again, up to ``push_max_attempts``: failed ones, and pending ones whose worker or
    message was lost, ``push_retry_interval`` after their last change; returns the job ids sent."""
    settings = ctx.settings
    now = utcnow()
    due = (
        Job.push_state.in_([PushState.PUSH_FAILED, PushState.PENDING])
        & (Job.push_attempts < settings.push_max_attempts)
        & (Job.updated_at < now - timedelta(seconds=settings.push_retry_interval))
    )
    with ctx.db.session() as session:
        candidates = session.execute(
            select(Job.id, Job.queue).where(Job.state == JobState.SUCCEEDED, due)
        ).all()
    sent: list[str] = []
    for job_id, queue in candidates:
        with ctx.db.session() as session:
            claimed = session.execute(
                update(Job).where(Job.id == job_id, due).values(push_state=PushState.PENDING, updated_at=now)
            ).rowcount
            session.commit()
        if claimed and send_push(ctx.celery, job_id, queue):
            sent.append(job_id)
    return sent
