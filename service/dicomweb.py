"""DICOMweb exchange with a PACS: pull a study (QIDO-RS + WADO-RS), push results back (STOW-RS), and the
storage of studies a PACS pushes to the service (STOW-RS, routes in :mod:`service.api.dicomweb`).

Nothing here reads the environment: the PACS client comes from :func:`pacs_client` (``Settings.dicomweb_*``)
and the storage root and client id are parameters. Pushed instances belong to the client whose key pushed
them, under ``<root>/incoming/<client>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from python_multipart.multipart import parse_options_header
from retrying import RetryError

from service.config import Settings
from service.errors import ApiError
from service.multipart import Part

log = logging.getLogger(__name__)

NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "RTIMAGE", "PR", "KO", "DOC", "REG", "FID"}
    | {"RWV", "AU", "ECG", "HD", "PLAN", "SMR"}
)
STOW_BATCH_SIZE = 32
RETRY_ATTEMPTS = 3  # requests refused, timed out or answered 408/429/503/504 are retried ...
RETRY_WAIT_MS = 500  # ... after 1 s, then 2 s
DEFER_BYTES = 64 * 1024  # element values above this are not read when a received instance is checked
DICOM_TYPE = b"application/dicom"
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Failure Reason (0008,1197) values of PS3.4 Annex B used in STOW-RS responses.
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000


class DicomWebError(RuntimeError):
    """A DICOMweb exchange failed; ``str(exc)`` is meant for the user.

    ``status_code`` is the HTTP status the API should answer: 404 (unknown study), 422 (study without
    image series, malformed UID), 502 (the PACS answered with an error) or 503 (PACS unreachable or not
    configured). ``pacs_status`` is the HTTP status the PACS answered, when it answered with an error.
    """

    def __init__(self, message: str, status_code: int, pacs_status: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.pacs_status = pacs_status


def is_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def pacs_client(settings: Settings) -> DICOMwebClient:
    """DICOMweb client for ``settings.dicomweb_url``, with basic auth when a username is set (503 if unset)."""
    url = settings.dicomweb_url.strip()
    if not url:
        raise DicomWebError("no PACS is configured for DICOMweb (set TTASEG_DICOMWEB_URL)", 503)
    username = settings.dicomweb_username
    password = settings.dicomweb_password.get_secret_value()
    session = create_session_from_user_pass(username, password) if username else None
    client = DICOMwebClient(url, session=session)
    client.set_http_retry_params(max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


@contextmanager
def _pacs_errors(action: str, url: str) -> Iterator[None]:
    """Turn transport and HTTP errors of the DICOMweb client into DicomWebError."""
    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 404:
            raise DicomWebError(f"{action}: not found on the PACS", 404) from exc
        if status in (401, 403):
            raise DicomWebError(
                f"{action}: the PACS refused access (HTTP {status}); check the credentials", 502
            ) from exc
        raise DicomWebError(f"{action}: the PACS answered HTTP {status}", 502, status) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise DicomWebError(f"{action}: the PACS at {url} cannot be reached", 503) from exc
    except RetryError as exc:  # how dicomweb-client gives up after repeated 408/429/503/504 answers
        raise DicomWebError(f"{action}: the PACS at {url} stays unavailable; try again later", 503) from exc
    except (requests.RequestException, ValueError) as exc:
        log.warning("%s: unexpected answer from the PACS: %s", action, exc)
        raise DicomWebError(f"{action}: unexpected answer from the PACS", 502) from exc


def fetch_study(study_uid: str, dest_dir: Path, client: DICOMwebClient) -> list[Path]:
    """Download the image series of a study into ``dest_dir/<SeriesInstanceUID>/NNNNNN.dcm``.

    Series are listed with QIDO-RS and retrieved with WADO-RS; non-image series (SEG, SR, RTSTRUCT, ...)
    and instances without pixel data are skipped. Returns the series folders written.
    """
    if not is_uid(study_uid):
        raise DicomWebError("the StudyInstanceUID is not a valid DICOM UID", 422)
    with _pacs_errors(f"listing the series of study {study_uid}", client.base_url):
        found = client.search_for_series(study_instance_uid=study_uid, get_remaining=True)
    if not found:
        raise DicomWebError(f"study {study_uid} was not found on the PACS", 404)
    folders: list[Path] = []
    for item in found:
        meta = pydicom.Dataset.from_json(item)
        series_uid = str(meta.get("SeriesInstanceUID", ""))
        if not is_uid(series_uid) or str(meta.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            continue
        folder = Path(dest_dir) / series_uid
        count = 0
        with _pacs_errors(f"retrieving series {series_uid}", client.base_url):
            for ds in client.iter_series(study_uid, series_uid):
                if "PixelData" not in ds:
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                ds.save_as(folder / f"{count:06d}.dcm", enforce_file_format=True)
                count += 1
        if count:
            folders.append(folder)
    if not folders:
        raise DicomWebError(f"study {study_uid} holds no image series", 422)
    return folders


def push_instances(paths: list[Path], client: DICOMwebClient) -> None:
    """Store DICOM files on the PACS with STOW-RS; raises DicomWebError when any is refused."""
    for start in range(0, len(paths), STOW_BATCH_SIZE):
        datasets = [pydicom.dcmread(p) for p in paths[start : start + STOW_BATCH_SIZE]]
        with _pacs_errors("storing results on the PACS", client.base_url):
            answer = client.store_instances(datasets)
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
            refused = f"the PACS refused {len(failed)} of {len(datasets)} instances"
            raise DicomWebError(f"{refused} (failure reason {', '.join(reasons)})", 502)


def check_stow_type(content_type: str) -> None:
    """Refuse (415) a STOW-RS request that is not ``multipart/related; type="application/dicom"``."""
    media_type, params = parse_options_header(content_type)
    if media_type.lower() != b"multipart/related":
        raise ApiError(415, 'send multipart/related; type="application/dicom"')
    if params.get(b"type", DICOM_TYPE).lower() != DICOM_TYPE:
        raise ApiError(
            415, "only application/dicom parts are accepted (not application/dicom+json or bulk data)"
        )


def spool_stow_part(part: Part) -> bool:
    """Multipart hook of STOW-RS: every part is spooled to disk and must be application/dicom (else 415)."""
    media_type = part.header_options("content-type")[0] or DICOM_TYPE
    if media_type != DICOM_TYPE:
        raise ApiError(415, f"part {part.number} is not application/dicom")
    return True


def incoming_dir(root: Path, client_id: str) -> Path:
    """Folder of the studies a client pushed: ``root/incoming/<client>``.

    A client id that is not a safe file name (letters, digits, ``._-``, at most 64) is replaced by a digest
    of it, prefixed with ``~`` so that it never equals a safe name.
    """
    name = (
        client_id if _SAFE_NAME.fullmatch(client_id) else "~" + hashlib.sha256(client_id.encode()).hexdigest()
    )
    return Path(root) / "incoming" / name


def incoming_study_series(root: Path, client_id: str, study_uid: str) -> list[Path]:
    """Folders of the series ``client_id`` pushed for a study (empty when it pushed none).

    Raises ValueError for a malformed StudyInstanceUID.
    """
    if not is_uid(study_uid):
        raise ValueError("not a valid StudyInstanceUID")
    study = incoming_dir(root, client_id) / study_uid
    if not study.is_dir():
        return []
    return sorted(d for d in study.iterdir() if d.is_dir() and any(d.glob("*.dcm")))


def image_series(folders: list[Path]) -> list[Path]:
    """The series folders whose first instance is not of a non-image modality (SEG, SR, ...)."""
    kept = []
    for folder in folders:
        first = min(folder.glob("*.dcm"))
        modality = str(pydicom.dcmread(first, stop_before_pixels=True).get("Modality", "")).upper()
        if modality not in NON_IMAGE_MODALITIES:
            kept.append(folder)
    return kept


def _instance_uids(part: Part) -> tuple[str, str, str, str]:
    """Study, series, SOP instance and SOP class UIDs of a spooled part (400 when it is not DICOM Part 10)."""
    assert part.path is not None
    try:
        ds = pydicom.dcmread(part.path, stop_before_pixels=True, defer_size=DEFER_BYTES)
        study, series, sop, sop_class = (str(ds.get(k, "")) for k in _UID_KEYWORDS)
    except Exception as exc:  # pydicom raises many types for corrupt input
        log.info("STOW-RS part %d is not DICOM Part 10: %s", part.number, exc)
        raise ApiError(400, f"part {part.number} is not a DICOM Part 10 file") from None
    return study, series, sop, sop_class


def _write_instance(src: Path, folder: Path, sop_uid: str) -> int | None:
    """Move one received instance into place atomically; the STOW-RS failure reason, or None when stored."""
    partial = folder / f".{sop_uid}.{uuid.uuid4().hex}.part"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.move(src, partial)
        partial.replace(folder / f"{sop_uid}.dcm")
        return None
    except OSError as exc:
        log.warning("STOW-RS: instance %s not stored: %s", sop_uid, exc)
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        return FAILURE_OUT_OF_RESOURCES


def store_parts(parts: list[Part], root: Path, client_id: str) -> pydicom.Dataset:
    """Check the spooled parts of a STOW-RS request, move them under :func:`incoming_dir` and answer.

    Every part is read first (without pixel data or large values): one that is not DICOM Part 10 refuses the
    whole request (400) before anything is stored. Returns the PS3.18 Store Instances response dataset.
    """
    if not parts:
        raise ApiError(400, "the request holds no DICOM instances")
    checked = [(part, _instance_uids(part)) for part in parts]
    owner = incoming_dir(root, client_id)
    stored, failed = [], []
    for part, (study, series, sop, sop_class) in checked:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = sop_class[:64]
        item.ReferencedSOPInstanceUID = sop[:64]
        if all(is_uid(u) for u in (study, series, sop, sop_class)):
            assert part.path is not None
            reason = _write_instance(part.path, owner / study / series, sop)
        else:
            reason = FAILURE_CANNOT_UNDERSTAND
        if reason is None:
            stored.append(item)
        else:
            item.FailureReason = reason
            failed.append(item)
    answer = pydicom.Dataset()
    answer.ReferencedSOPSequence = stored
    if failed:
        answer.FailedSOPSequence = failed
    return answer
