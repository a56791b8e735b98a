"""Builders of hostile scan files: headers that point elsewhere, lie about sizes, or inflate without bound.

Each builder writes small files into a folder and returns their paths; ``hostile_cases`` lists them all with the
words the refusal must contain. Used by the unit tests of ``models.io`` and the API tests.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

EXTERNAL = "data must be inside the file"
SHAPE = (6, 12, 10)  # x, y, z


def volume(shape: tuple[int, ...] = SHAPE, dtype: str = "<i2", seed: int = 0) -> np.ndarray:
    """Random non-constant voxels in file order (x fastest)."""
    values = np.random.default_rng(seed).integers(0, 1000, size=shape[::-1])
    return values.astype(dtype)


def nifti_header(shape: tuple[int, ...] = SHAPE, dtype: str = "<i2", endian: str = "<", **fields) -> bytes:
    """A single-file NIfTI-1 header (352 bytes) with ``fields`` overriding nibabel's values."""
    header = nib.Nifti1Header(endianness=endian)
    header.set_data_dtype(np.dtype(dtype))
    header.set_data_shape(shape)
    header.set_zooms((1.0,) * len(shape))
    header["vox_offset"] = 352
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    for key, value in fields.items():
        header[key] = value
    return header.binaryblock + b"\0" * 4


def nifti(path: Path, shape=SHAPE, dtype: str = "<i2", data: bytes | None = None, gz: bool = False, **fields):
    """A NIfTI file of random voxels (``data`` replaces them), gzip-compressed with ``gz``."""
    body = nifti_header(shape, dtype, **fields) + (volume(shape, dtype).tobytes() if data is None else data)
    path.write_bytes(gzip.compress(body, 1) if gz else body)
    return path


def mha(path: Path, lines: list[str], data: bytes | None = None) -> Path:
    """A MetaImage file from header lines (the last one is normally ``ElementDataFile``) and data."""
    path.write_bytes(("\n".join(lines) + "\n").encode() + (volume().tobytes() if data is None else data))
    return path


MHA_HEAD = ["ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False"]
MHA_GRID = [
    "ElementSpacing = 1 1 1",
    f"DimSize = {SHAPE[0]} {SHAPE[1]} {SHAPE[2]}",
    "ElementType = MET_SHORT",
]


def mha_lines(data_file: str = "LOCAL", *extra: str) -> list[str]:
    """Header lines of a MetaImage of SHAPE with ``extra`` lines before ``ElementDataFile``."""
    return [*MHA_HEAD, *MHA_GRID, *extra, f"ElementDataFile = {data_file}"]


def nrrd(path: Path, fields: dict[str, str], data: bytes | None = None, blank: bool = True) -> Path:
    """A NRRD file: ``fields`` over a valid header of SHAPE, raw little-endian shorts unless ``data``."""
    base = {
        "type": "short",
        "dimension": "3",
        "space": "left-posterior-superior",
        "sizes": " ".join(map(str, SHAPE)),
        "space directions": "(1,0,0) (0,1,0) (0,0,1)",
        "endian": "little",
        "encoding": "raw",
        "space origin": "(0,0,0)",
    }
    base.update(fields)
    text = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in base.items() if v is not None)
    path.write_bytes(
        (text + ("\n" if blank else "")).encode() + (volume().tobytes() if data is None else data)
    )
    return path


def gzip_zeros(nbytes: int, prefix: bytes = b"", wbits: int = 31) -> bytes:
    """``prefix`` followed by ``nbytes`` zeros, compressed (gzip, or zlib with ``wbits`` 15)."""
    encoder = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return encoder.compress(prefix) + encoder.compress(b"\0" * nbytes) + encoder.flush()


def gzip_bomb(path: Path, inflated: int, shape: tuple[int, ...] = (8, 8, 8)) -> Path:
    """A .nii.gz whose header claims ``shape`` of uint8 while it inflates to ``inflated`` bytes of zeros.

    Written as concatenated gzip members of 16 MiB each (about 1 MB compressed per GiB), as gzip allows.
    """
    block = 16 * 1024**2
    member = gzip_zeros(block)
    with path.open("wb") as out:
        out.write(gzip_zeros(block, nifti_header(shape, "u1")))
        for _ in range(inflated // block - 1):
            out.write(member)
    return path


def dicom_slice(
    path: Path,
    series: str,
    z: float,
    rows: int = 16,
    columns: int = 16,
    pixels: bytes | None = None,
    deflated: bool = False,
    **elements,
) -> Path:
    """One MR DICOM instance of 16-bit voxels at height ``z``; ``pixels`` may lie about Rows x Columns."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", series
    ds.Modality, ds.PatientName, ds.InstanceNumber = "MR", "Test^Hostile", int(z) + 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.0 * z], [1, 0, 0, 0, 1, 0]
    for key, value in elements.items():
        setattr(ds, key, value)
    frames = int(elements.get("NumberOfFrames", 1))
    if pixels is None:
        pixels = volume((columns, rows, frames), seed=int(z)).tobytes()
    ds.PixelData = pixels
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_series(folder: Path, n: int = 4, **kwargs) -> list[Path]:
    """``n`` slices of one series in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    return [dicom_slice(folder / f"{k:03d}.dcm", series, k, **kwargs) for k in range(n)]


@dataclass(frozen=True)
class Case:
    """A hostile input: the files to send, words the refusal must contain, and what the API may answer."""

    kind: str
    files: list[Path]
    reason: str
    api_status: int = 422
    api_reason: str | None = None


def _external_cases(tmp: Path) -> list[Case]:
    raw = tmp / "voxels.raw"
    raw.write_bytes(volume().tobytes())
    return [
        Case("MHA ElementDataFile absolute", [mha(tmp / "abs.mha", mha_lines("/etc/passwd"), b"")], EXTERNAL),
        Case(
            "MHA ElementDataFile relative",
            [mha(tmp / "rel.mha", mha_lines("../../../etc/hosts"), b"")],
            EXTERNAL,
        ),
        Case(
            "MHA ElementDataFile missing target",
            [mha(tmp / "gone.mha", mha_lines("/no/such/file.raw"), b"")],
            EXTERNAL,
        ),
        Case(
            "MHA ElementDataFile LIST",
            [mha(tmp / "list.mha", [*mha_lines("LIST"), "/etc/passwd", "/etc/hosts"], b"")],
            EXTERNAL,
        ),
        Case(
            "MHA ElementDataFile pattern",
            [mha(tmp / "pattern.mha", mha_lines("/etc/slice%03d.raw 1 10 1"), b"")],
            EXTERNAL,
        ),
        Case(
            "MHA lower-case elementdatafile",
            [mha(tmp / "lower.mha", [*MHA_HEAD, *MHA_GRID, "elementdatafile = /etc/passwd"], b"")],
            EXTERNAL,
        ),
        Case("MHA ElementDataFile = LoCaL", [mha(tmp / "case.mha", mha_lines("LoCaL"))], EXTERNAL),
        Case("MHA ElementDataFile = 'LOCAL '", [mha(tmp / "space.mha", mha_lines("LOCAL "))], EXTERNAL),
        Case("MHA without ElementDataFile", [mha(tmp / "none.mha", [*MHA_HEAD, *MHA_GRID])], "header"),
        Case(
            "MHA data file smuggled into a value",
            [
                mha(
                    tmp / "smuggle.mha",
                    [
                        *MHA_HEAD,
                        "ElementSpacing = 1 1 1 ElementDataFile = /etc/passwd",
                        *MHA_GRID[1:],
                        "ElementDataFile = LOCAL",
                    ],
                )
            ],
            "must hold numbers",
        ),  # fmt: skip
        Case(
            "MHA HeaderSize", [mha(tmp / "skip.mha", mha_lines("LOCAL", "HeaderSize = -1"))], "not accepted"
        ),
        Case(
            "MetaImage detached header .mhd",
            [mha(tmp / "detached.mhd", mha_lines(raw.name), b"")],
            EXTERNAL,
        ),
        Case(
            "NRRD data file absolute", [nrrd(tmp / "abs.nrrd", {"data file": "/etc/passwd"}, b"")], EXTERNAL
        ),
        Case(
            "NRRD datafile relative", [nrrd(tmp / "rel.nrrd", {"datafile": "../../etc/hosts"}, b"")], EXTERNAL
        ),
        Case(
            "NRRD Data File LIST",
            [nrrd(tmp / "list.nrrd", {"Data File": "LIST"}, b"/etc/passwd\n/etc/hosts\n", blank=False)],
            EXTERNAL,
        ),
        Case(
            "NRRD detached header .nhdr",
            [nrrd(tmp / "detached.nhdr", {"data file": raw.name}, b"", blank=False)],
            EXTERNAL,
        ),
        Case(
            "NIfTI .hdr/.img pair (magic ni1)",
            [nifti(tmp / "pair.hdr", data=b"", magic=b"ni1")],
            EXTERNAL,
            api_reason=EXTERNAL,
        ),
        Case("NIfTI magic ni1 in a .nii", [nifti(tmp / "ni1.nii", data=b"", magic=b"ni1")], EXTERNAL),
        Case(
            "Analyze 7.5 header",
            [nifti(tmp / "analyze.hdr", data=b"", magic=b"\0\0\0")],
            EXTERNAL,
            api_status=415,
            api_reason="not a NIfTI",
        ),
    ]


def _size_cases(tmp: Path) -> list[Case]:
    good = volume().tobytes()
    return [
        Case(
            "NIfTI header claims more than the file",
            [nifti(tmp / "short.nii", (256, 256, 64), data=b"\1\2" * 1000)],
            "truncated",
        ),
        Case("NIfTI header only", [nifti(tmp / "empty.nii", data=b"")], "truncated"),
        Case("gzip bomb NIfTI", [gzip_bomb(tmp / "bomb.nii.gz", 64 * 1024**2)], "inflates"),
        Case(
            "gzip bomb in a second gzip member",
            [_write(tmp / "member.nii.gz", gzip.compress(nifti_header() + good) + gzip_zeros(16 * 1024**2))],
            "inflates",
        ),
        Case(
            "MHA zlib bomb",
            [
                mha(
                    tmp / "zbomb.mha",
                    mha_lines("LOCAL", "CompressedData = True"),
                    gzip_zeros(16 * 1024**2, wbits=15),
                )
            ],
            "inflates",
        ),
        Case(
            "NRRD gzip bomb",
            [nrrd(tmp / "gbomb.nrrd", {"encoding": "gzip"}, gzip_zeros(16 * 1024**2))],
            "inflates",
        ),
        Case(
            "NIfTI header over the voxel limit",
            [nifti(tmp / "huge.nii.gz", (1024, 1024, 1024), "u1", data=b"\0" * 64, gz=True)],
            "voxels; the limit",
        ),
        Case(
            "NIfTI side over the limit", [nifti(tmp / "wide.nii", (30000, 4, 4), "u1", data=b"")], "too large"
        ),
        Case("negative size", [nifti(tmp / "neg.nii", dim=[3, 6, -12, 10, 1, 1, 1, 1])], "positive"),
        Case("zero size", [nifti(tmp / "zero.nii", dim=[3, 6, 0, 10, 1, 1, 1, 1])], "positive"),
        Case("eight dimensions", [nifti(tmp / "dims.nii", dim=[9, 6, 12, 10, 1, 1, 1, 1])], "dimensions"),
        Case("absurd voxel offset", [nifti(tmp / "offset.nii", vox_offset=1e12)], "voxel offset"),
        Case("truncated MHA", [mha(tmp / "cut.mha", mha_lines(), good[:100])], "truncated"),
        Case(
            "truncated compressed MHA",
            [mha(tmp / "cutz.mha", mha_lines("LOCAL", "CompressedData = True"), zlib.compress(good)[:60])],
            "corrupt or truncated",
        ),
        Case(
            "corrupt gzip stream",
            [_write(tmp / "flipped.nii.gz", _flip(gzip.compress(nifti_header() + good)))],
            "corrupt or truncated",
        ),
        Case("truncated NRRD", [nrrd(tmp / "cut.nrrd", {}, good[:50])], "truncated"),
        Case("NRRD sizes not matching its dimension", [nrrd(tmp / "dim.nrrd", {"dimension": "4"})], "sizes"),
    ]


def _header_cases(tmp: Path) -> list[Case]:
    return [
        Case("absurd spacing", [nifti(tmp / "far.nii", pixdim=[1, 1, 1, 1e6, 1, 1, 1, 1])], "spacing"),
        Case("NaN spacing", [nifti(tmp / "nan.nii", pixdim=[1, 1, np.nan, 1, 1, 1, 1, 1])], "spacing"),
        Case("zero spacing", [nifti(tmp / "thin.nii", pixdim=[1, 1, 0, 1, 1, 1, 1, 1])], "spacing"),
        Case(
            "zero spacing MHA",
            [
                mha(
                    tmp / "zero.mha",
                    [*MHA_HEAD, "ElementSpacing = 0 1 1", *MHA_GRID[1:], "ElementDataFile = LOCAL"],
                )
            ],
            "spacing",
        ),
        Case("absurd origin", [mha(tmp / "far.mha", mha_lines("LOCAL", "Offset = 1e30 0 0"))], "origin"),
        Case(
            "singular direction cosines",
            [nrrd(tmp / "flat.nrrd", {"space directions": "(1,0,0) (1,0,0) (0,0,1)"})],
            "orientation",
        ),
        Case(
            "NaN origin", [nrrd(tmp / "origin.nrrd", {"space origin": "(nan,0,0)"})], "not a readable image"
        ),
        Case(
            "singular NIfTI affine",
            [nifti(tmp / "sing.nii", qform_code=0, srow_x=[0] * 4, srow_y=[0] * 4, srow_z=[0] * 4)],
            "not a readable image",
        ),
        Case(
            "NRRD ascii encoding", [nrrd(tmp / "ascii.nrrd", {"encoding": "ascii"}, b"1 2 3\n")], "encoding"
        ),
        Case("NRRD byte skip", [nrrd(tmp / "skip.nrrd", {"byte skip": "-1"})], "byte skip"),
        Case("NRRD unknown field", [nrrd(tmp / "field.nrrd", {"fetch url": "http://x"})], "unknown NRRD"),
        Case("RGB NIfTI", [nifti(tmp / "rgb.nii", datatype=128, bitpix=24)], "scalar"),
        Case("unknown NIfTI voxel type", [nifti(tmp / "type.nii", datatype=4096)], "voxel type"),
        Case(
            "MHA three channels",
            [mha(tmp / "rgb.mha", mha_lines("LOCAL", "ElementNumberOfChannels = 3"), volume().tobytes() * 3)],
            "scalar",
        ),
        Case(
            "MHA ASCII data",
            [
                mha(
                    tmp / "text.mha",
                    [*MHA_HEAD[:2], "BinaryData = False", *MHA_GRID, "ElementDataFile = LOCAL"],
                    b"1 2 3",
                )
            ],
            "BinaryData",
        ),  # fmt: skip
        Case(
            "MHA binary header", [mha(tmp / "bin.mha", ["ObjectType = Image", "NDims = \x01\x02"])], "control"
        ),
        Case(
            "Inf voxels in NRRD",
            [nrrd(tmp / "inf.nrrd", {"type": "float"}, np.full(SHAPE[::-1], np.inf, "<f4").tobytes())],
            "NaN or infinite",
        ),
    ]


def _dicom_cases(tmp: Path) -> list[Case]:
    series = generate_uid()
    huge = tmp / "dicom_huge"
    huge.mkdir()
    big = tmp / "dicom_big"
    big.mkdir()
    mixed = tmp / "dicom_mixed"
    mixed.mkdir()
    uid = generate_uid()
    return [
        Case(
            "DICOM Rows x Columns over the side limit",
            [
                dicom_slice(huge / f"{k}.dcm", series, k, rows=60000, columns=60000, pixels=b"\0" * 64)
                for k in range(2)
            ],
            "too large",
        ),
        Case(
            "DICOM series over the voxel limit",
            [
                dicom_slice(big / f"{k}.dcm", uid, k, rows=2048, columns=2048, pixels=b"\0" * 64)
                for k in range(33)  # above 512^3 voxels
            ],
            "voxels; the limit",
        ),
        Case("deflated DICOM", dicom_series(tmp / "dicom_deflated", deflated=True), "deflate"),
        Case("multi-frame DICOM", dicom_series(tmp / "dicom_frames", n=2, NumberOfFrames=3), "multi-frame"),
        Case(
            "DICOM slices of different sizes",
            [
                dicom_slice(mixed / "a.dcm", series, 0),
                dicom_slice(mixed / "b.dcm", series, 1, rows=8, columns=8),
            ],
            "different sizes",
        ),
        Case(
            "DICOM pixel data shorter than declared",
            dicom_series(tmp / "dicom_short", n=3, rows=256, columns=256, pixels=b"\0" * 64),
            "truncated",
        ),
        Case(
            "DICOM colour slices",
            dicom_series(tmp / "dicom_rgb", n=2, SamplesPerPixel=3, pixels=b"\1" * 16 * 16 * 6),
            "scalar",
        ),
    ]


def hostile_cases(tmp: Path) -> list[Case]:
    """Every hostile input kind, written under ``tmp``."""
    builders: list[Callable[[Path], list[Case]]] = [_external_cases, _size_cases, _header_cases, _dicom_cases]
    cases = []
    for build in builders:
        folder = tmp / build.__name__.strip("_")
        folder.mkdir(parents=True, exist_ok=True)
        cases.extend(build(folder))
    return cases


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _flip(data: bytes) -> bytes:
    """Corrupt the middle of a compressed stream."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 16]) + data[middle + 16 :]
