"""DICOMweb exchange with a PACS: pull a study (QIDO-RS + WADO-RS), push results back (STOW-RS), and a
STOW-RS endpoint that receives studies a PACS pushes to the service.

Settings (environment): ``TTASEG_DICOMWEB_URL`` (DICOMweb root of the PACS, e.g.
http://127.0.0.1:8042/dicom-web), ``TTASEG_DICOMWEB_USERNAME`` / ``TTASEG_DICOMWEB_PASSWORD`` (HTTP basic
auth, optional). Pushed instances land in
``<storage root>/incoming/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``; the storage root
(``TTASEG_STORAGE_DIR``, default ./var/storage) and the largest request (``TTASEG_MAX_UPLOAD_BYTES``) are
the service settings.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from retrying import RetryError
from starlette.concurrency import run_in_threadpool

from service.config import get_settings

NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "RTIMAGE", "PR", "KO", "DOC", "REG", "FID"}
    | {"RWV", "AU", "ECG", "HD", "PLAN", "SMR"}
)
STOW_BATCH_SIZE = 32
RETRY_ATTEMPTS = 3  # requests refused, timed out or answered 408/429/503/504 are retried ...
RETRY_WAIT_MS = 500  # ... after 1 s, then 2 s
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
# Failure Reason (0008,1197) values of PS3.4 Annex B used in STOW-RS responses.
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_PROCESSING = 0x0110


class DicomWebError(RuntimeError):
    """A DICOMweb exchange failed; ``str(exc)`` is meant for the user.

    ``status_code`` is the HTTP status the API should answer: 404 (unknown study), 422 (study without
    image series, malformed UID), 502 (the PACS answered with an error) or 503 (PACS unreachable or not
    configured).
    """

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class StowMediaTypeError(ValueError):
    """A STOW-RS request whose media type the service does not accept (HTTP 415)."""


def is_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, at most 64 characters)."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def storage_root() -> Path:
    """Storage root of the service (``TTASEG_STORAGE_DIR``, default ./var/storage)."""
    return get_settings().resolved_storage_dir


def client_from_env() -> DICOMwebClient:
    """DICOMweb client for ``TTASEG_DICOMWEB_URL``, with basic auth when a username is set."""
    url = os.environ.get("TTASEG_DICOMWEB_URL", "").strip()
    if not url:
        raise DicomWebError("no PACS is configured for DICOMweb (set TTASEG_DICOMWEB_URL)", 503)
    username = os.environ.get("TTASEG_DICOMWEB_USERNAME")
    password = os.environ.get("TTASEG_DICOMWEB_PASSWORD", "")
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
        raise DicomWebError(f"{action}: the PACS answered HTTP {status}", 502) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise DicomWebError(f"{action}: the PACS at {url} cannot be reached", 503) from exc
    except RetryError as exc:  # how dicomweb-client gives up after repeated 408/429/503/504 answers
        raise DicomWebError(f"{action}: the PACS at {url} stays unavailable; try again later", 503) from exc
    except (requests.RequestException, ValueError) as exc:
        raise DicomWebError(f"{action}: unexpected answer from the PACS ({exc})", 502) from exc


def fetch_study(study_uid: str, dest_dir: Path, client: DICOMwebClient | None = None) -> list[Path]:
    """Download the image series of a study into ``dest_dir/<SeriesInstanceUID>/NNNNNN.dcm``.

    Series are listed with QIDO-RS and retrieved with WADO-RS; non-image series (SEG, SR, RTSTRUCT, ...)
    and instances without pixel data are skipped. Returns the series folders written.
    """
    if not is_uid(study_uid):
        raise DicomWebError(f"{study_uid!r} is not a valid StudyInstanceUID", 422)
    client = client or client_from_env()
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


def push_instances(paths: list[Path], client: DICOMwebClient | None = None) -> None:
    """Store DICOM files on the PACS with STOW-RS; raises DicomWebError when any is refused."""
    client = client or client_from_env()
    for start in range(0, len(paths), STOW_BATCH_SIZE):
        datasets = [pydicom.dcmread(p) for p in paths[start : start + STOW_BATCH_SIZE]]
        with _pacs_errors("storing results on the PACS", client.base_url):
            answer = client.store_instances(datasets)
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
            refused = f"the PACS refused {len(failed)} of {len(datasets)} instances"
            raise DicomWebError(f"{refused} (failure reason {', '.join(reasons)})", 502)


def _multipart_parts(body: bytes, boundary: bytes) -> list[tuple[dict[str, str], bytes]]:
    """(headers, content) of each part of a multipart body."""
    parts: list[tuple[dict[str, str], bytes]] = []
    headers: dict[str, str] = {}
    field, value, data = bytearray(), bytearray(), bytearray()
    ended = False

    def on_part_begin() -> None:
        nonlocal headers, data
        headers, data = {}, bytearray()

    def on_header_end() -> None:
        headers[field.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        field.clear()
        value.clear()

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": lambda b, s, e: field.extend(b[s:e]),
            "on_header_value": lambda b, s, e: value.extend(b[s:e]),
            "on_header_end": on_header_end,
            "on_part_data": lambda b, s, e: data.extend(b[s:e]),
            "on_part_end": lambda: parts.append((headers, bytes(data))),
            "on_end": on_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise ValueError(f"malformed multipart body: {exc}") from exc
    if not ended:
        raise ValueError("malformed multipart body: the closing boundary is missing (truncated request?)")
    return parts


def parse_stow_request(body: bytes, content_type: str) -> list[pydicom.Dataset]:
    """Datasets of a STOW-RS request body (``multipart/related; type="application/dicom"``).

    Raises StowMediaTypeError (a ValueError) for another media type, ValueError for a malformed body or a
    part that is not a DICOM Part 10 file.
    """
    media_type, params = parse_options_header(content_type or "")
    if media_type.lower() != b"multipart/related":
        raise StowMediaTypeError(
            f'expected multipart/related; type="application/dicom", got {content_type!r}'
        )
    part_type = params.get(b"type", b"application/dicom").lower()
    if part_type != b"application/dicom":
        raise StowMediaTypeError(
            f"only application/dicom parts are accepted, not {part_type.decode('latin-1')}"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ValueError("the multipart/related content type has no boundary")
    datasets = []
    for number, (headers, content) in enumerate(_multipart_parts(body, boundary), start=1):
        own_type = parse_options_header(headers.get("content-type", "application/dicom"))[0].lower()
        if own_type != b"application/dicom":
            raise ValueError(
                f"part {number} has content type {own_type.decode('latin-1')}, not application/dicom"
            )
        try:
            datasets.append(pydicom.dcmread(BytesIO(content)))
        except Exception as exc:  # pydicom raises many types for corrupt input
            raise ValueError(f"part {number} is not a DICOM Part 10 file ({exc})") from exc
    if not datasets:
        raise ValueError("the request holds no DICOM instances")
    return datasets


def _write_instance(ds: pydicom.Dataset, folder: Path, sop_uid: str) -> int | None:
    """Write one received instance atomically; the STOW-RS failure reason, or None when stored."""
    partial = folder / f".{sop_uid}.{uuid.uuid4().hex}.part"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(partial, enforce_file_format=True)
        partial.replace(folder / f"{sop_uid}.dcm")
        return None
    except OSError:
        reason = FAILURE_OUT_OF_RESOURCES
    except Exception:  # an instance pydicom cannot re-encode must not fail the others
        reason = FAILURE_PROCESSING
    partial.unlink(missing_ok=True)
    return reason


def _store_received(datasets: list[pydicom.Dataset], root: Path) -> pydicom.Dataset:
    """Write received instances under ``root/incoming`` and build the STOW-RS response dataset."""
    stored, failed = [], []
    for ds in datasets:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = str(ds.get("SOPClassUID", ""))
        item.ReferencedSOPInstanceUID = str(ds.get("SOPInstanceUID", ""))
        study, series, sop = (
            str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        )
        if all(is_uid(u) for u in (study, series, sop, item.ReferencedSOPClassUID)):
            reason = _write_instance(ds, root / "incoming" / study / series, sop)
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


def incoming_study_series(study_uid: str) -> list[Path]:
    """Folders of the series received for a study by STOW-RS (empty when nothing was received)."""
    if not is_uid(study_uid):
        raise ValueError(f"{study_uid!r} is not a valid StudyInstanceUID")
    study = storage_root() / "incoming" / study_uid
    if not study.is_dir():
        return []
    return sorted(d for d in study.iterdir() if d.is_dir() and any(d.glob("*.dcm")))


async def _read_body(request: Request) -> bytes:
    limit = get_settings().max_upload_bytes
    if int(request.headers.get("content-length") or 0) > limit:
        raise HTTPException(413, f"STOW-RS request larger than {limit // 2**20} MB")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, f"STOW-RS request larger than {limit // 2**20} MB")
    return bytes(body)


router = APIRouter()


@router.post("/dicomweb/studies", summary="Receive instances pushed by a PACS (STOW-RS)")
async def stow_studies(request: Request) -> JSONResponse:
    """Store the pushed instances; answers the PS3.18 Store Instances response (application/dicom+json).

    200: all stored; 202: some failed (FailedSOPSequence); 409: none stored; 400/415: bad request body.
    """
    body = await _read_body(request)
    try:
        datasets = await run_in_threadpool(parse_stow_request, body, request.headers.get("content-type", ""))
    except StowMediaTypeError as exc:
        raise HTTPException(415, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    answer = await run_in_threadpool(_store_received, datasets, storage_root())
    failed = len(answer.get("FailedSOPSequence") or [])
    status = 200 if not failed else 409 if failed == len(datasets) else 202
    return JSONResponse(answer.to_json_dict(), status_code=status, media_type="application/dicom+json")


@router.get("/dicomweb/studies/{study_uid}", summary="Series and instances received for a pushed study")
def incoming_study_status(study_uid: str) -> dict:
    """Received series of a study with their instance counts; 404 when nothing was received."""
    try:
        folders = incoming_study_series(study_uid)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    if not folders:
        raise HTTPException(404, f"no instances received for study {study_uid}")
    series = [{"series_instance_uid": f.name, "instances": len(list(f.glob("*.dcm")))} for f in folders]
    return {
        "study_instance_uid": study_uid,
        "series": series,
        "instances": sum(s["instances"] for s in series),
    }
