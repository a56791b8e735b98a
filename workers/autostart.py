"""Automatic start of jobs on studies pushed over STOW-RS, from the worker housekeeping loop.

A client's study under ``<storage>/incoming/<client>/<StudyInstanceUID>/`` is ready once no instance has
arrived for ``study_quiet_seconds`` (the newest modification time of its folders: storing an instance
renames it into its series folder). It is routed with ``routing_rules`` (:mod:`service.routing`) and claimed
once, in the transaction that records its job, by a unique row in ``incoming_studies``; a study no rule
matches gets an ``unrouted`` row instead. Instances arriving after the claim start nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from models.bundle import BundleError, resolve_bundle
from service import dicomweb
from service.db import IncomingStudy
from service.jobs import enqueue, job_record, new_job_id
from service.routing import load_rules, route
from service.states import IncomingState, JobSource
from workers.context import Context

log = logging.getLogger(__name__)


def quiet_studies(root: Path, quiet_seconds: float, known: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """(client, StudyInstanceUID) of the studies under ``root/incoming`` not in ``known`` and quiet."""
    incoming = Path(root) / "incoming"
    if not incoming.is_dir():
        return []
    now = time.time()
    ready = []
    for client_dir in sorted(d for d in incoming.iterdir() if d.is_dir() and not d.name.startswith("~")):
        for study_dir in sorted(d for d in client_dir.iterdir() if d.is_dir()):
            key = (client_dir.name, study_dir.name)
            if key in known or not dicomweb.is_uid(study_dir.name):
                continue
            series = dicomweb.incoming_study_series(root, *key)
            if series and now - max(d.stat().st_mtime for d in [study_dir, *series]) >= quiet_seconds:
                ready.append(key)
    return ready


def start_quiet_studies(ctx: Context) -> list[str]:
    """Start a job on every quiet, unclaimed study that a routing rule matches; returns the job ids."""
    settings = ctx.settings
    if settings.routing_rules is None:
        return []
    rules = load_rules(settings.routing_rules)
    with ctx.db.session() as session:
        known = {
            tuple(row) for row in session.execute(select(IncomingStudy.client_id, IncomingStudy.study_uid))
        }
    started = []
    for client_id, study_uid in quiet_studies(
        settings.resolved_storage_dir, settings.study_quiet_seconds, known
    ):
        series = dicomweb.incoming_study_series(settings.resolved_storage_dir, client_id, study_uid)
        target = route(rules, client_id, series)
        row = IncomingStudy(client_id=client_id, study_uid=study_uid, state=IncomingState.UNROUTED)
        job = None
        if target is None:
            row.reason = "no routing rule matches the study's series"
        else:
            try:
                bundle = resolve_bundle(
                    target.model, root=str(settings.bundles) if settings.bundles else None
                )
            except BundleError as exc:
                row.reason = f"routing rule names an unusable model: {exc}"[:500]
            else:
                job = job_record(
                    job_id=new_job_id(),
                    client_id=client_id,
                    model_ref=target.model,
                    bundle_name=bundle.card.name,
                    bundle_version=bundle.card.version,
                    labels={str(k): v for k, v in bundle.card.labels.items()},
                    adaptation=target.adaptation.value,
                    steps=None,
                    domain=target.domain,
                    queue=settings.job_queue,
                    source=JobSource.DICOMWEB,
                    study_uid=study_uid,
                )
                row.state, row.job_id = IncomingState.STARTED, job.id
        try:
            with ctx.db.session() as session:
                session.add_all([row, *([job] if job else [])])
                session.commit()
        except IntegrityError:  # another worker claimed it first
            continue
        if job is None:
            log.warning("study %s of %s not started: %s", study_uid, client_id, row.reason)
            continue
        log.info("study %s of %s quiet: started job %s (%s)", study_uid, client_id, job.id, target)
        enqueue(ctx.db, ctx.celery, job.id, job.queue)
        started.append(job.id)
    return started
