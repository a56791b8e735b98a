"""Prometheus metrics: job counts and stage durations come from the database, so every API replica agrees."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from service.db import Database, Job, Worker, utcnow
from service.states import JobState

BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, float("inf"))


class JobCollector(Collector):
    """Collects job-state gauges, queue depth, live workers and stage-duration histograms at scrape time."""

    def __init__(self, db: Database, worker_fresh_seconds: float) -> None:
        self.db = db
        self.worker_fresh_seconds = worker_fresh_seconds

    def _histogram(self, session, column, name: str, doc: str) -> HistogramMetricFamily:
        cols = [func.sum(case((column <= b, 1), else_=0)) for b in BUCKETS[:-1]]
        row = session.execute(
            select(func.count(column), func.coalesce(func.sum(column), 0.0), *cols).where(
                Job.state == JobState.SUCCEEDED.value, column.is_not(None)
            )
        ).one()
        count, total, *cum = row
        buckets = [(str(b), int(c or 0)) for b, c in zip(BUCKETS[:-1], cum, strict=True)]
        buckets.append(("+Inf", int(count)))
        metric = HistogramMetricFamily(name, doc)
        metric.add_metric([], buckets, float(total))
        return metric

    def collect(self) -> Iterator[object]:
        with self.db.session() as session:
            by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            by_queue = dict(
                session.execute(
                    select(Job.queue, func.count())
                    .where(Job.state == JobState.QUEUED.value)
                    .group_by(Job.queue)
                ).all()
            )
            fresh = utcnow() - timedelta(seconds=self.worker_fresh_seconds)
            workers = session.scalar(
                select(func.count()).select_from(Worker).where(Worker.last_seen >= fresh)
            )
            jobs = GaugeMetricFamily("ttaseg_jobs", "Jobs by state.", labels=["state"])
            for state in JobState:
                jobs.add_metric([state.value], float(by_state.get(state.value, 0)))
            yield jobs
            depth = GaugeMetricFamily("ttaseg_queue_depth", "Jobs waiting for a worker.", labels=["queue"])
            for queue, count in sorted(by_queue.items()):
                depth.add_metric([queue], float(count))
            yield depth
            yield GaugeMetricFamily(
                "ttaseg_workers_alive", "Workers with a recent heartbeat.", value=workers or 0
            )
            yield self._histogram(
                session, Job.adapt_seconds, "ttaseg_adaptation_seconds", "Adaptation time of succeeded jobs."
            )
            yield self._histogram(
                session,
                Job.segment_seconds,
                "ttaseg_inference_seconds",
                "Segmentation time of succeeded jobs.",
            )


class Metrics:
    """The API process's registry: database-backed collector plus request counters."""

    def __init__(self, db: Database, worker_fresh_seconds: float) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(JobCollector(db, worker_fresh_seconds))
        self.submitted = Counter(
            "ttaseg_jobs_submitted", "Jobs accepted by this API process.", registry=self.registry
        )
        self.rejected = Counter(
            "ttaseg_jobs_rejected",
            "Job submissions refused, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
