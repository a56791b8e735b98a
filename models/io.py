"""Image input/output with SimpleITK: NIfTI, NRRD, MHA and DICOM series, with validation of what comes in.

Input files are untrusted. Before SimpleITK opens one, its header is parsed here: voxel data kept in another
file (MetaImage ``ElementDataFile``, NRRD ``data file``, NIfTI ``ni1``/Analyze ``.hdr``/``.img`` pairs) is refused,
every size limit is enforced from the header, the stored bytes are counted against what the header claims
(compressed streams are inflated in bounded chunks, never held whole) and the voxels are checked for NaN/Inf and
for a constant image on the way. Only then is the file read, by the ImageIO that its own format names, never one
found by SimpleITK's probing. DICOM series are read from the given files only, never from anything they name.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import SimpleITK as sitk

MAX_VOXELS = 512 * 512 * 512
MAX_SIDE = 2048
MIN_SIDE = 2
SPACING_RANGE = (0.01, 100.0)  # mm
MAX_ORIGIN = 1e6  # mm
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DETACHED_SUFFIXES = (".mhd", ".nhdr", ".hdr", ".hdr.gz", ".img", ".img.gz", ".raw", ".zraw")
CHUNK = 4 * 1024 * 1024
MAX_HEADER = 64 * 1024
GZIP_SLACK = 4096  # bytes a compressed stream may carry beyond header and voxels
DEFLATED_DICOM = b"1.2.840.10008.1.2.1.99"


class InputError(ValueError):
    """A scan that cannot be segmented; the message says why, in words a user can act on."""


@dataclass(frozen=True)
class ImageHeader:
    """A scan's checked geometry: the 3D grid as SimpleITK will read it, and its stored voxel type."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    pixel_type: str

    @property
    def voxels(self) -> int:
        """Number of voxels of the 3D volume."""
        return int(np.prod(self.size))


@dataclass(frozen=True)
class _Layout:
    """Where a file's voxels are and how they are stored, from its own header."""

    io: str
    elements: int
    dtype: np.dtype
    start: int  # file position where the (possibly compressed) stream begins
    offset: int  # position of the first voxel in the decoded stream
    codec: Literal["raw", "gzip", "zlib"]

    @property
    def nbytes(self) -> int:
        return self.elements * self.dtype.itemsize


def case_name(path: str | Path) -> str:
    """Case name of an input: the file name without its image extension, or the DICOM folder's name."""
    p = Path(path)
    if p.is_dir():
        return p.name
    name = p.name
    for suffix in IMAGE_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def _external(name: str, field: str) -> InputError:
    return InputError(
        f"{name}: the header points to voxel data in another file; data must be inside the file: {field}"
    )


def _unreadable(name: str, why: str = "corrupt or truncated") -> InputError:
    return InputError(f"{name}: not a readable image ({why})")


# --- NIfTI -----------------------------------------------------------------------------------------------------

_NIFTI_TYPES = {
    2: "u1",
    4: "i2",
    8: "i4",
    16: "f4",
    64: "f8",
    256: "i1",
    512: "u2",
    768: "u4",
    1024: "i8",
    1280: "u8",
}
_NIFTI_VECTOR_TYPES = {32, 128, 1792, 2048, 2304}  # complex and RGB(A)


def _leading_bytes(path: Path, n: int, compressed: bool) -> bytes:
    try:
        if compressed:
            with gzip.open(path, "rb") as fh:
                return fh.read(n)
        with path.open("rb") as fh:
            return fh.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _nifti_layout(path: Path, name: str) -> _Layout:
    """Layout of a single-file NIfTI-1/2 (gzip or not); refuses two-file NIfTI and Analyze."""
    compressed = _is_gzip(path)
    head = _leading_bytes(path, 544, compressed)
    if len(head) < 348:
        raise _unreadable(name)
    endian = next((e for e in "<>" if struct.unpack(e + "i", head[:4])[0] in (348, 540)), None)
    if endian is None:
        raise _unreadable(name, "no NIfTI header")
    if struct.unpack(endian + "i", head[:4])[0] == 348:
        if head[344:348] != b"n+1\x00":
            raise _external(name, "single-file NIfTI (magic 'n+1'), not a .hdr/.img pair or Analyze")
        dim = struct.unpack(endian + "8h", head[40:56])
        datatype = struct.unpack(endian + "h", head[70:72])[0]
        pixdim = struct.unpack(endian + "8f", head[76:108])
        vox_offset = struct.unpack(endian + "f", head[108:112])[0]
        header_size = 352
    else:
        if len(head) < 540:
            raise _unreadable(name)
        if head[4:8] != b"n+2\x00":
            raise _external(name, "single-file NIfTI-2 (magic 'n+2'), not a .hdr/.img pair")
        datatype = struct.unpack(endian + "h", head[12:14])[0]
        dim = struct.unpack(endian + "8q", head[16:80])
        pixdim = struct.unpack(endian + "8d", head[104:168])
        vox_offset = struct.unpack(endian + "q", head[168:176])[0]
        header_size = 544
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise InputError(f"{name}: the header declares {ndim} dimensions")
    shape = dim[1 : ndim + 1]
    if min(shape) < 1:
        raise InputError(f"{name}: the header declares a size of {tuple(shape)}; every side must be positive")
    if not all(np.isfinite(p) and p != 0 for p in pixdim[1 : min(ndim, 3) + 1]):
        raise InputError(f"{name}: implausible voxel spacing {tuple(pixdim[1:4])} in the header")
    if datatype in _NIFTI_VECTOR_TYPES:
        raise InputError("expected a scalar (grey-level) image, got a multi-component (e.g. RGB) image")
    if datatype not in _NIFTI_TYPES:
        raise InputError(f"{name}: unsupported NIfTI voxel type code {datatype}")
    if not (np.isfinite(vox_offset) and header_size <= vox_offset <= MAX_HEADER + header_size):
        raise InputError(f"{name}: implausible voxel offset {vox_offset} in the header")
    return _Layout(
        "NiftiImageIO",
        _product(shape),
        np.dtype(endian + _NIFTI_TYPES[datatype]),
        0,
        int(vox_offset),
        "gzip" if compressed else "raw",
    )


# --- NRRD ------------------------------------------------------------------------------------------------------

_NRRD_TYPES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": (
        "longlong",
        "long long",
        "long long int",
        "signed long long",
        "signed long long int",
        "int64",
        "int64_t",
    ),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}
_NRRD_TYPE = {alias: code for code, aliases in _NRRD_TYPES.items() for alias in aliases}
_NRRD_FIELDS = {
    "dimension", "type", "sizes", "spacings", "thicknesses", "axismins", "axismaxs", "centers", "centerings",
    "labels", "units", "kinds", "min", "max", "oldmin", "oldmax", "endian", "encoding", "lineskip", "byteskip",
    "content", "sampleunits", "space", "spacedimension", "spacedirections", "spaceorigin", "spaceunits",
    "measurementframe", "blocksize", "number",
}  # fmt: skip


def _header_lines(path: Path, name: str) -> Iterator[tuple[str, int]]:
    """Text lines of a header (a carriage return kept) with the file position after each."""
    with path.open("rb") as fh:
        block = fh.read(MAX_HEADER)
    pos = 0
    while True:
        end = block.find(b"\n", pos)
        if end < 0:
            raise InputError(f"{name}: header without voxel data (or longer than {MAX_HEADER} bytes)")
        raw = block[pos:end]
        pos = end + 1
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InputError(f"{name}: the header is not plain text") from None
        if not line.rstrip("\r").replace("\t", " ").isprintable():
            raise InputError(f"{name}: the header has control characters")
        yield line, pos


def _nrrd_layout(path: Path, name: str) -> _Layout:
    """Layout of a NRRD with attached raw or gzip data; refuses detached data and unknown fields."""
    fields: dict[str, str] = {}
    lines = _header_lines(path, name)
    first, _ = next(lines)
    if not re.fullmatch(r"NRRD000[1-5]\r?", first):
        raise _unreadable(name, "no NRRD magic")
    start = 0
    for raw, pos in lines:
        line = raw.rstrip("\r")
        if not line:
            start = pos
            break
        if line.startswith("#"):
            continue
        key_value = line.split(":=", 1)
        if len(key_value) == 2 and ": " not in key_value[0]:
            continue
        if ": " not in line:
            raise InputError(f"{name}: unreadable NRRD header line")
        key, value = line.split(": ", 1)
        field = re.sub(r"\s+", "", key).lower()
        if field == "datafile":
            raise _external(name, "no NRRD 'data file' field (a detached header)")
        if field not in _NRRD_FIELDS:
            raise InputError(f"{name}: unknown NRRD header field")
        if field in fields:
            raise InputError(f"{name}: NRRD header field '{field}' given twice")
        fields[field] = value.strip()
    try:
        ndim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
        code = _NRRD_TYPE[re.sub(r"\s+", " ", fields["type"]).lower()]
    except (KeyError, ValueError):
        raise InputError(f"{name}: NRRD header without a valid dimension, sizes and type") from None
    if len(sizes) != ndim or not 1 <= ndim <= 16:
        raise InputError(f"{name}: NRRD sizes do not match its dimension")
    if min(sizes) < 1:
        raise InputError(f"{name}: the header declares a size of {tuple(sizes)}; every side must be positive")
    encoding = fields.get("encoding", "").lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise InputError(f"{name}: NRRD encoding '{encoding}' is not accepted; use raw or gzip")
    if fields.get("lineskip", "0") != "0" or fields.get("byteskip", "0") != "0":
        raise InputError(f"{name}: NRRD 'line skip'/'byte skip' is not accepted")
    endian = {"little": "<", "big": ">"}.get(fields.get("endian", "little").lower())
    if endian is None:
        raise InputError(f"{name}: NRRD endian must be little or big")
    return _Layout(
        "NrrdImageIO", _product(sizes), np.dtype(endian + code), start, 0 if encoding != "raw" else start,
        "raw" if encoding == "raw" else "gzip",
    )  # fmt: skip


# --- MetaImage -------------------------------------------------------------------------------------------------

_MET_TYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
    "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}  # fmt: skip
_MET_NUMBERS = {
    "NDims", "DimSize", "ElementSpacing", "ElementSize", "Offset", "Origin", "Position", "TransformMatrix",
    "Rotation", "Orientation", "CenterOfRotation", "Color", "ElementMin", "ElementMax", "ID", "ParentID",
    "CompressedDataSize", "HeaderSize", "ElementNumberOfChannels", "SequenceID",
}  # fmt: skip
_MET_FLAGS = {"BinaryData", "BinaryDataByteOrderMSB", "ElementByteOrderMSB", "CompressedData"}
_NUMBERS = re.compile(r"(?:[-+]?(?:[0-9.]+(?:e[-+]?[0-9]+)?|nan|inf(?:inity)?)(?:\s+|$))*", re.IGNORECASE)


def _mha_layout(path: Path, name: str) -> _Layout:
    """Layout of a MetaImage with ``ElementDataFile = LOCAL``; refuses every other data file and odd fields."""
    fields: dict[str, str] = {}
    start = None
    for line, pos in _header_lines(path, name):
        if not line.strip():
            continue
        match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_\[\]]*)\s*=\s*(.*?)\s*", line)  # dim[0]: ITK metadata
        if match is None:
            raise InputError(f"{name}: unreadable MetaImage header line")
        key, value = match.groups()
        if key.lower() == "elementdatafile":
            # exactly MetaIO's spellings of LOCAL, nothing after them: anything else names a file
            if not re.fullmatch(r"\s*ElementDataFile\s*=\s*(?:LOCAL|Local|local)", line):
                raise _external(name, "ElementDataFile = LOCAL")
            start = pos
            break
        if key in _MET_NUMBERS and not _NUMBERS.fullmatch(value):
            raise InputError(f"{name}: MetaImage field {key} must hold numbers")
        if key in _MET_FLAGS and value not in ("True", "False", "true", "false", "1", "0"):
            raise InputError(f"{name}: MetaImage field {key} must be True or False")
        if key.lower() == "headersize" or "=" in value:
            raise InputError(f"{name}: MetaImage field {key} is not accepted")
        if key in fields:
            raise InputError(f"{name}: MetaImage field {key} given twice")
        fields[key] = value
    if start is None:
        raise _external(name, "ElementDataFile = LOCAL")
    if fields.get("ObjectType", "Image") != "Image":
        raise InputError(f"{name}: MetaImage object is not an image")
    if fields.get("BinaryData", "True").lower() in ("false", "0"):
        raise InputError(f"{name}: MetaImage text (BinaryData = False) data is not accepted")
    try:
        ndim = int(fields["NDims"])
        sizes = [int(s) for s in fields["DimSize"].split()]
        code = _MET_TYPES[fields["ElementType"]]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except (KeyError, ValueError):
        raise InputError(f"{name}: MetaImage header without a valid NDims, DimSize and ElementType") from None
    if len(sizes) != ndim or not 1 <= ndim <= 16 or channels < 1:
        raise InputError(f"{name}: MetaImage DimSize does not match NDims")
    if min(sizes) < 1:
        raise InputError(f"{name}: the header declares a size of {tuple(sizes)}; every side must be positive")
    msb = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")).lower()
    compressed = fields.get("CompressedData", "False").lower() in ("true", "1")
    return _Layout(
        "MetaImageIO", _product(sizes) * channels, np.dtype((">" if msb in ("true", "1") else "<") + code),
        start, 0 if compressed else start, "zlib" if compressed else "raw",
    )  # fmt: skip


# --- the stored voxels -----------------------------------------------------------------------------------------


def _product(values: Sequence[int]) -> int:
    """Exact product of sizes (Python integers: no overflow whatever the header claims)."""
    out = 1
    for v in values:
        out *= int(v)
    return out


def _inflated(fh: BinaryIO, members: bool) -> Iterator[bytes]:
    """Decoded bytes of a gzip (``members``: concatenated gzip members) or zlib stream, in bounded chunks."""
    decoder = zlib.decompressobj(31 if members else 47)
    data = b""
    while True:
        if not data:
            data = fh.read(CHUNK)
            if not data:
                while out := decoder.decompress(b"", CHUNK):
                    yield out
                if not decoder.eof:
                    raise EOFError
                return
        if decoder.eof:
            if len(data) < 2:
                data += fh.read(CHUNK)
            if not (members and data[:2] == b"\x1f\x8b"):
                return
            decoder = zlib.decompressobj(31)
        out = decoder.decompress(data, CHUNK)
        data = decoder.unused_data if decoder.eof else decoder.unconsumed_tail
        if out:
            yield out


def _voxel_chunks(path: Path, layout: _Layout, name: str) -> Iterator[bytes]:
    """The stored voxel bytes in bounded chunks; refuses truncated data and streams that inflate beyond it."""
    if layout.codec == "raw":
        held = path.stat().st_size - layout.offset
        if held < layout.nbytes:
            raise InputError(
                f"{name}: truncated: the header claims {layout.nbytes} bytes of voxels, the file holds {max(held, 0)}"
            )
        with path.open("rb") as fh:
            fh.seek(layout.offset)
            left = layout.nbytes
            while left:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    raise _unreadable(name)
                left -= len(chunk)
                yield chunk
        return
    end = layout.offset + layout.nbytes
    seen = 0
    try:
        with path.open("rb") as fh:
            fh.seek(layout.start)
            for chunk in _inflated(fh, layout.codec == "gzip"):
                lo, hi = max(layout.offset - seen, 0), min(end - seen, len(chunk))
                seen += len(chunk)
                if seen > end + GZIP_SLACK:
                    raise InputError(
                        f"{name}: the compressed data inflates to more than the {layout.nbytes} bytes of voxels "
                        "its header declares"
                    )
                if lo < hi:
                    yield chunk[lo:hi]
    except (zlib.error, EOFError):
        raise _unreadable(name) from None
    if seen < end:
        raise InputError(
            f"{name}: truncated: the header claims {layout.nbytes} bytes of voxels, the data holds less"
        )


def _check_voxels(path: Path, layout: _Layout, name: str, first: int, count: int) -> None:
    """Refuse NaN/Inf and constant values among elements ``first``..``first+count`` with bounded memory."""
    size = layout.dtype.itemsize
    begin, stop = first * size, (first + count) * size
    floating = layout.dtype.kind == "f"
    lo, hi = np.inf, -np.inf
    pos, carry = 0, b""
    for chunk in _voxel_chunks(path, layout, name):
        a, b = max(begin - pos, 0), min(stop - pos, len(chunk))
        pos += len(chunk)
        if a >= b:
            continue
        buf = carry + chunk[a:b]
        usable = len(buf) - len(buf) % size
        values, carry = np.frombuffer(buf[:usable], layout.dtype), buf[usable:]
        if not values.size:
            continue
        if floating and not np.isfinite(values).all():
            raise InputError("image contains NaN or infinite values")
        if not lo < hi:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    if lo == hi:
        raise InputError("image is constant: nothing to segment")


# --- checks shared by files and DICOM --------------------------------------------------------------------------


def _check_size(size: Sequence[int], max_voxels: int) -> None:
    """Refuse a 3D size with a side too short or too long, or more voxels than ``max_voxels``."""
    size = tuple(int(n) for n in size)
    if min(size) < MIN_SIDE:
        raise InputError(f"image of size {size} is not a 3D volume (a side has fewer than {MIN_SIDE} voxels)")
    if max(size) > MAX_SIDE:
        raise InputError(f"image of size {size} is too large (max {MAX_SIDE} per side, {max_voxels} voxels)")
    if _product(size) > max_voxels:
        raise InputError(f"{_product(size)} voxels; the limit is {max_voxels}")


def _check_grid(
    size: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    max_voxels: int,
) -> None:
    """Refuse a 3D grid that is too small, too large, or has implausible spacing, origin or orientation."""
    _check_size(size, max_voxels)
    if not all(np.isfinite(s) and SPACING_RANGE[0] <= s <= SPACING_RANGE[1] for s in spacing):
        raise InputError(f"implausible voxel spacing {tuple(float(s) for s in spacing)} mm")
    if not all(np.isfinite(o) and abs(o) <= MAX_ORIGIN for o in origin):
        raise InputError("implausible image origin in the header")
    matrix = np.reshape(np.asarray(direction, float), (3, 3))
    if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix)) < 1e-3:
        raise InputError("singular or invalid orientation (direction cosines) in the header")


def _check_array(image: sitk.Image) -> None:
    """Refuse NaN/Inf and constant voxels of an image in memory, one slice at a time."""
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not all(np.isfinite(s).all() for s in array):
        raise InputError("image contains NaN or infinite values")
    if array.min() == array.max():
        raise InputError("image is constant: nothing to segment")


def validate_image(image: sitk.Image, *, max_voxels: int = MAX_VOXELS) -> None:
    """Raise InputError unless ``image`` is a finite, non-constant, sanely sized scalar 3D volume."""
    dim = image.GetDimension()
    if dim != 3:
        raise InputError(f"expected a 3D volume, got a {dim}D image of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("expected a scalar (grey-level) image, got a multi-component (e.g. RGB) image")
    _check_grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(), max_voxels)
    _check_array(image)


# --- image files -----------------------------------------------------------------------------------------------


def _layout(path: Path) -> _Layout:
    name, lower = path.name, path.name.lower()
    if lower.endswith(DETACHED_SUFFIXES):
        raise _external(name, "a single .nii, .nii.gz, .nrrd or .mha file, not a detached header or raw data")
    if lower.endswith((".nii", ".nii.gz")):
        return _nifti_layout(path, name)
    if lower.endswith(".nrrd"):
        return _nrrd_layout(path, name)
    if lower.endswith(".mha"):
        return _mha_layout(path, name)
    raise InputError(f"{name}: not a .nii, .nii.gz, .nrrd or .mha file")


def _check_file(path: Path, max_voxels: int, frame: int | None) -> tuple[ImageHeader, str]:
    """Check an image file from its headers and stored bytes; returns its header and the ImageIO to read it."""
    name = path.name
    layout = _layout(path)
    if layout.elements > max(max_voxels, MAX_VOXELS):
        raise InputError(f"{layout.elements} voxels; the limit is {max_voxels}")
    reader = sitk.ImageFileReader()
    reader.SetImageIO(layout.io)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise _unreadable(name) from None
    size, dim = reader.GetSize(), reader.GetDimension()
    if _product(size) * reader.GetNumberOfComponents() != layout.elements:
        raise InputError(f"{name}: the header is inconsistent (its sizes do not describe its voxel data)")
    if reader.GetNumberOfComponents() != 1:
        raise InputError("expected a scalar (grey-level) image, got a multi-component (e.g. RGB) image")
    if dim not in (3, 4):
        raise InputError(f"expected a 3D volume, got a {dim}D image of size {size}")
    first, count = 0, layout.elements
    if dim == 4:
        if frame is None:
            raise InputError(f"4D image of size {size}: choose a frame (0..{size[3] - 1})")
        if not 0 <= frame < size[3]:
            raise InputError(f"frame {frame} out of range 0..{size[3] - 1}")
        if layout.elements > MAX_VOXELS:
            raise InputError(f"4D image of {layout.elements} voxels in all; the limit is {MAX_VOXELS}")
        count = _product(size[:3])
        first = frame * count
    spacing, origin = reader.GetSpacing()[:3], reader.GetOrigin()[:3]
    direction = np.reshape(reader.GetDirection(), (dim, dim))[:3, :3].ravel()
    _check_grid(size[:3], spacing, origin, direction, max_voxels)
    _check_voxels(path, layout, name, first, count)
    header = ImageHeader(
        tuple(int(n) for n in size[:3]),
        tuple(float(s) for s in spacing),
        tuple(float(o) for o in origin),
        tuple(float(d) for d in direction),
        sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    )
    return header, layout.io


# --- DICOM -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    path: Path
    series: str
    rows: int
    columns: int
    frames: int
    samples: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    number: int
    pixel_bytes: int | None  # None when compressed (encapsulated)
    bits: int


def _dicom_files(paths: Sequence[Path]) -> list[Path]:
    """Regular files of the given folders (symbolic links refused) and the given files."""
    files: list[Path] = []
    for p in paths:
        if not p.is_dir():
            files.append(p)
            continue
        for folder, dirs, names in os.walk(p):
            entries = [Path(folder, n) for n in dirs + names]
            if any(e.is_symlink() for e in entries):
                raise InputError("the DICOM folder contains a symbolic link; only regular files are read")
            files.extend(sorted(e for e in entries if e.is_file()))
    return files


def _dicom_slice(path: Path) -> _Slice | None:
    """Header of one DICOM image instance (pixels not read, only their length), or None for anything else."""
    import pydicom

    with path.open("rb") as fh:
        if DEFLATED_DICOM in fh.read(8192):
            raise InputError("deflate-compressed DICOM files are not accepted")
    try:
        ds = pydicom.dcmread(
            path,
            force=True,
            defer_size=4096,
            specific_tags=[
                "SeriesInstanceUID", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
                "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "BitsAllocated", "PixelData",
            ],
        )  # fmt: skip
        series = str(ds.SeriesInstanceUID).strip()
        rows, columns = int(ds.Rows), int(ds.Columns)
        length = ds.get_item("PixelData", keep_deferred=True).length
    except Exception:  # pydicom raises many types for files that are not DICOM images
        return None

    def floats(keyword: str, n: int) -> tuple[float, ...] | None:
        try:
            values = tuple(float(v) for v in ds.get(keyword, ()))
        except (TypeError, ValueError):
            return None
        return values if len(values) == n and np.isfinite(values).all() else None

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        number = int(ds.get("InstanceNumber", 0) or 0)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (TypeError, ValueError):
        return None
    position, orientation = floats("ImagePositionPatient", 3), floats("ImageOrientationPatient", 6)
    pixel_bytes = None if length == 0xFFFFFFFF else int(length)
    return _Slice(
        path, series, rows, columns, frames, samples, position, orientation, number, pixel_bytes, bits
    )


def _dicom_series(paths: Sequence[Path], series_uid: str | None, max_voxels: int) -> list[_Slice]:
    """The chosen series' instances in slice order, checked from their headers before any pixel is read."""
    files = _dicom_files(paths)
    if not files:
        raise InputError("no files found for the DICOM series")
    by_series: dict[str, list[_Slice]] = {}
    for f in files:
        found = _dicom_slice(f)
        if found is not None:
            by_series.setdefault(found.series, []).append(found)
    if not by_series:
        raise InputError("no DICOM image instances found (files are not DICOM or carry no pixel data)")
    if series_uid is None:
        if len(by_series) > 1:
            listing = ", ".join(f"{uid} ({len(v)} files)" for uid, v in sorted(by_series.items()))
            raise InputError(f"several DICOM series found; choose one by SeriesInstanceUID: {listing}")
        series_uid = next(iter(by_series))
    if series_uid not in by_series:
        raise InputError(f"series {series_uid} not found among {sorted(by_series)}")
    slices = by_series[series_uid]
    if len(slices) < MIN_SIDE:
        raise InputError(f"DICOM series {series_uid} has {len(slices)} slice(s): a 3D volume needs several")
    if any(s.frames != 1 for s in slices):
        raise InputError("multi-frame DICOM instances are not accepted; send one instance per slice")
    if any(s.samples != 1 for s in slices):
        raise InputError("expected a scalar (grey-level) image, got a multi-component (e.g. RGB) image")
    if len({(s.rows, s.columns) for s in slices}) != 1:
        raise InputError(f"DICOM series {series_uid} mixes slices of different sizes")
    _check_size((slices[0].columns, slices[0].rows, len(slices)), max_voxels)
    for s in slices:
        if s.pixel_bytes is not None and s.pixel_bytes < s.rows * s.columns * max(s.bits // 8, 1):
            raise InputError(
                f"DICOM series {series_uid} is truncated: a slice holds fewer pixels than it declares"
            )
    return _slice_order(slices)


def _slice_order(slices: list[_Slice]) -> list[_Slice]:
    """Sort along the slice normal by ImagePositionPatient (by InstanceNumber where positions are missing)."""
    orientation = slices[0].orientation
    if orientation is None or any(s.position is None for s in slices):
        return sorted(slices, key=lambda s: (s.number, s.path.name))
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(slices, key=lambda s: (float(np.dot(normal, s.position)), s.number))


def _read_series(slices: Sequence[_Slice]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(s.path) for s in slices])
    try:
        return reader.Execute()  # applies RescaleSlope/Intercept
    except RuntimeError:
        raise InputError(f"cannot assemble DICOM series {slices[0].series}: a slice is unreadable") from None


def _check_dicom(slices: Sequence[_Slice], max_voxels: int) -> ImageHeader:
    """Geometry from the first two slices, then the voxels one slice at a time."""
    head = _read_series(slices[:2])
    size = (slices[0].columns, slices[0].rows, len(slices))
    _check_grid(size, head.GetSpacing(), head.GetOrigin(), head.GetDirection(), max_voxels)
    lo, hi = np.inf, -np.inf
    for s in slices:
        try:
            array = sitk.GetArrayViewFromImage(sitk.ReadImage(str(s.path), imageIO="GDCMImageIO"))
        except RuntimeError:
            raise InputError(f"cannot assemble DICOM series {s.series}: a slice is unreadable") from None
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise InputError("image contains NaN or infinite values")
        lo, hi = min(lo, float(array.min())), max(hi, float(array.max()))
    if lo == hi:
        raise InputError("image is constant: nothing to segment")
    return ImageHeader(
        size,
        tuple(float(v) for v in head.GetSpacing()),
        tuple(float(v) for v in head.GetOrigin()),
        tuple(float(v) for v in head.GetDirection()),
        head.GetPixelIDTypeAsString(),
    )


# --- entry points ----------------------------------------------------------------------------------------------


def _paths(source: str | Path | Sequence[str | Path]) -> tuple[list[Path], Path | None]:
    paths = [Path(source)] if isinstance(source, str | Path) else [Path(s) for s in source]
    for p in paths:
        if not p.exists():
            raise InputError(f"{p.name}: file not found")
    single = paths[0] if len(paths) == 1 else None
    named_image = (
        single is not None
        and single.is_file()
        and single.name.lower().endswith(IMAGE_SUFFIXES + DETACHED_SUFFIXES)
    )
    return paths, single if named_image else None


def check_image(
    source: str | Path | Sequence[str | Path],
    *,
    max_voxels: int = MAX_VOXELS,
    series_uid: str | None = None,
    frame: int | None = None,
) -> ImageHeader:
    """Check a scan without holding its pixels: headers, limits, stored bytes and voxel values.

    Memory stays bounded (a few chunks or one DICOM slice) whatever the file claims; raises InputError with a
    reason that names no server path. ``read_image`` runs the same checks before it reads.
    """
    paths, image_file = _paths(source)
    if image_file is not None:
        return _check_file(image_file, max_voxels, frame)[0]
    return _check_dicom(_dicom_series(paths, series_uid, max_voxels), max_voxels)


def read_image(
    source: str | Path | Sequence[str | Path],
    series_uid: str | None = None,
    frame: int | None = None,
    *,
    max_voxels: int | None = None,
) -> sitk.Image:
    """Read and validate a 3D scan: an image file, a DICOM folder, or a list of DICOM files.

    Headers are checked first (no data outside the file, sizes within ``max_voxels``, default MAX_VOXELS) and the
    pixels are read only then. A 4D image is accepted only when ``frame`` picks one of its volumes.
    """
    limit = MAX_VOXELS if max_voxels is None else max_voxels
    paths, image_file = _paths(source)
    if image_file is not None:
        header, io = _check_file(image_file, limit, frame)
        reader = sitk.ImageFileReader()
        reader.SetImageIO(io)
        reader.SetFileName(str(image_file))
        try:
            image = reader.Execute()
        except RuntimeError:
            raise _unreadable(image_file.name) from None
        if image.GetDimension() == 4:
            size = list(image.GetSize())
            size[3] = 0
            image = sitk.Extract(image, size, [0, 0, 0, frame])
        if image.GetSize() != header.size:
            raise InputError(
                f"{image_file.name}: the header is inconsistent (its sizes do not match the voxels)"
            )
    else:
        image = _read_series(_dicom_series(paths, series_uid, limit))
    validate_image(image, max_voxels=limit)
    return image


def write_image(image: sitk.Image, path: str | Path) -> Path:
    """Write an image (compressed when the format allows) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-5) -> bool:
    """True when two images share size, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )
