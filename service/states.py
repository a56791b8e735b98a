"""The life cycle of a job and of its scans: the one place their states and phases are named.

A job is ``queued`` when accepted, ``running`` once a worker claims it, and ends ``succeeded``, ``failed`` or
``cancelled``; a worker that dies sends it back to ``queued``. While running, its ``phase`` says what it is
doing (``models.terms.Phase``). A scan is ``pending`` until its job ends, then ``succeeded`` or ``failed``.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is in its life cycle."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        """Whether the job may still change (queued or running)."""
        return self in ACTIVE_STATES


ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.RUNNING})


class ScanState(StrEnum):
    """Whether a scan's results exist."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobSource(StrEnum):
    """Where a job's scans came from."""

    UPLOAD = "upload"
    DICOMWEB = "dicomweb"


class PushState(StrEnum):
    """Whether a job's results were stored on the PACS (DICOMweb jobs with a configured PACS only)."""

    NONE = "none"
    PENDING = "pending"
    PUSHED = "pushed"
    PUSH_FAILED = "push_failed"


class IncomingState(StrEnum):
    """What the automatic start does with a study pushed over STOW-RS: nothing (no routing rules: jobs are
    posted by hand), waits for the study to be quiet, started a job, or found no rule for it."""

    MANUAL = "manual"
    WAITING = "waiting"
    STARTED = "started"
    UNROUTED = "unrouted"
