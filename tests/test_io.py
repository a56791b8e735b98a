"""Reading and validating scans: real NIfTI and DICOM, and every kind of bad input."""

from __future__ import annotations

import re
import shutil
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api_tests"))

from hostile_files import (
    EXTERNAL,
    SHAPE,
    Case,
    dicom_series,
    gzip_bomb,
    hostile_cases,
    mha,
    mha_lines,
    nifti,
    nifti_header,
    nrrd,
    volume,
)

from models.io import IMAGE_SUFFIXES, InputError, case_name, check_image, read_image

PROSTATE = "dicom/prostate3t_t2/Prostate3T-03-0001"


def _write(tmp_path, array, name="x.nii.gz", spacing=None):
    img = sitk.GetImageFromArray(array)
    if spacing:
        img.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(img, str(path))
    return path


def test_reads_real_nifti_with_oblique_header(data_dir):
    path = data_dir / "cardiac/mscmr_lge/images/subject1_lge.nii.gz"
    img = read_image(path)
    assert img.GetDimension() == 3
    assert not np.allclose(np.reshape(img.GetDirection(), (3, 3)), np.eye(3))
    assert case_name(path) == "subject1_lge"


def test_dicom_series_assembled_in_slice_order(data_dir):
    folder = data_dir / "dicom/prostate3t_t2/Prostate3T-03-0001"
    img = read_image(folder)
    files = sorted(folder.iterdir())
    assert img.GetSize()[2] == len(files)
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    normal = np.cross(*np.reshape(np.array(dss[0].ImageOrientationPatient, float), (2, 3)))
    positions = sorted(float(np.dot(normal, d.ImagePositionPatient)) for d in dss)
    assert img.GetSpacing()[0] == pytest.approx(float(dss[0].PixelSpacing[1]), abs=1e-4)
    assert img.GetSpacing()[2] == pytest.approx(np.median(np.diff(positions)), abs=1e-3)
    # first voxel sits at the lowest position along the slice normal
    assert float(np.dot(normal, img.GetOrigin())) == pytest.approx(positions[0], abs=1e-3)
    assert case_name(folder) == "Prostate3T-03-0001"


def test_shuffled_dicom_file_list_gives_the_same_volume(data_dir, tmp_path):
    folder = data_dir / "dicom/prostate3t_t2/Prostate3T-03-0002"
    files = sorted(folder.iterdir())
    rng = np.random.default_rng(0)
    shuffled = [files[i] for i in rng.permutation(len(files))]
    a, b = read_image(folder), read_image(shuffled)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetOrigin() == b.GetOrigin()


def test_two_series_in_one_folder_must_be_chosen(data_dir, tmp_path):
    for name in ("Prostate3T-03-0001", "Prostate3T-03-0002"):
        for f in (data_dir / "dicom/prostate3t_t2" / name).iterdir():
            shutil.copy(f, tmp_path / f"{name}-{f.name}")
    with pytest.raises(InputError, match="several DICOM series"):
        read_image(tmp_path)
    uid = pydicom.dcmread(
        next(tmp_path.glob("Prostate3T-03-0002-*")), stop_before_pixels=True
    ).SeriesInstanceUID
    assert read_image(tmp_path, series_uid=uid).GetSize()[2] == len(
        list(tmp_path.glob("Prostate3T-03-0002-*"))
    )


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.random.rand(32, 32).astype(np.float32), "3D volume"),
        (np.full((8, 16, 16), 3.0, np.float32), "constant"),
        (np.where(np.random.rand(8, 16, 16) > 0.5, np.nan, 1.0).astype(np.float32), "NaN"),
        (np.where(np.random.rand(8, 16, 16) > 0.5, np.inf, 1.0).astype(np.float32), "NaN or infinite"),
        (np.random.rand(1, 16, 16).astype(np.float32), "not a 3D volume"),
    ],
)
def test_bad_volumes_rejected_with_reason(tmp_path, array, message):
    with pytest.raises(InputError, match=message):
        read_image(_write(tmp_path, array))


def test_4d_needs_a_frame(tmp_path):
    vol = np.random.rand(3, 6, 16, 16).astype(np.float32)
    path = tmp_path / "cine.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(vol, isVector=False), str(path))
    with pytest.raises(InputError, match="4D image"):
        read_image(path)
    assert read_image(path, frame=2).GetSize() == (16, 16, 6)
    with pytest.raises(InputError, match="out of range"):
        read_image(path, frame=5)


def test_truncated_and_garbage_files(tmp_path, data_dir):
    src = (data_dir / "cardiac/mscmr_lge/images/subject1_lge.nii.gz").read_bytes()
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(src[: len(src) // 3])
    with pytest.raises(InputError, match="corrupt or truncated"):
        read_image(truncated)
    garbage = tmp_path / "noise.nii"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError):
        read_image(garbage)
    not_dicom = tmp_path / "notes"
    not_dicom.mkdir()
    (not_dicom / "a.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM image"):
        read_image(not_dicom)
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")


def test_absurd_size_and_spacing(tmp_path):
    img = sitk.Image(4096, 4, 4, sitk.sitkUInt8)
    sitk.WriteImage(img, str(tmp_path / "wide.nii.gz"))
    with pytest.raises(InputError, match="too large"):
        read_image(tmp_path / "wide.nii.gz")
    with pytest.raises(InputError, match="spacing"):
        read_image(_write(tmp_path, np.random.rand(4, 8, 8).astype(np.float32), spacing=(1.0, 1.0, 500.0)))


# --- hostile files --------------------------------------------------------------------------------------------

SERVER_PATH = re.compile(r"(?<![\w.'])/(?:[\w.-]+/)+")
LIMIT = 8_000_000


def _refusal(tmp_path: Path, call, *args, **kwargs) -> str:
    """The InputError message of ``call(*args, **kwargs)``, checked to name no server path."""
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert str(tmp_path) not in message and "/etc" not in message and not SERVER_PATH.search(message), message
    return message


def _source(case: Case) -> Path | list[Path]:
    return case.files[0] if len(case.files) == 1 else case.files


def test_hostile_files_refused_before_reading(tmp_path, monkeypatch):
    """Every hostile kind is an InputError with its reason, raised before SimpleITK reads any pixel."""

    def no_pixels(self):
        raise AssertionError("pixels read")

    cases = hostile_cases(tmp_path)
    assert len(cases) >= 50
    failures = []
    for case in cases:
        for reader in (check_image, read_image):
            if case.kind.endswith(("absolute", "relative", "LIST", "pattern", "target", "elementdatafile")):
                monkeypatch.setattr(sitk.ImageFileReader, "ReadImageInformation", no_pixels)
            monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_pixels)
            monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", no_pixels)
            try:
                message = _refusal(tmp_path, reader, _source(case), max_voxels=LIMIT)
            except AssertionError as exc:
                failures.append(f"{case.kind} ({reader.__name__}): {exc}")
            else:
                if case.reason.lower() not in message.lower():
                    failures.append(f"{case.kind} ({reader.__name__}): {message}")
            monkeypatch.undo()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "build",
    [
        lambda folder, target: mha(folder / "x.mha", mha_lines(target), b""),
        lambda folder, target: nrrd(folder / "x.nrrd", {"data file": target}, b""),
    ],
)
def test_external_data_refusal_does_not_reveal_whether_the_target_exists(tmp_path, build):
    secret = tmp_path / "secret.raw"
    secret.write_bytes(volume().tobytes())
    messages = set()
    for n, target in enumerate([str(secret), str(tmp_path / "missing.raw"), "/etc/passwd", "secret.raw"]):
        folder = tmp_path / str(n)
        folder.mkdir()
        messages.add(_refusal(tmp_path, read_image, build(folder, target)))
    assert len(messages) == 1 and EXTERNAL in messages.pop()


def test_extension_does_not_choose_a_reader(tmp_path):
    """Only the four single-file formats are read, each by its own ImageIO after its own magic is found."""
    good = nifti(tmp_path / "good.nii")
    (tmp_path / "nifti.mha").write_bytes(good.read_bytes())
    (tmp_path / "meta.nii").write_bytes(mha(tmp_path / "m.mha", mha_lines()).read_bytes())
    sitk.WriteImage(sitk.GetImageFromArray(volume().astype(np.uint8)), str(tmp_path / "scan.vtk"))
    assert "header" in _refusal(tmp_path, read_image, tmp_path / "nifti.mha")
    assert "no NIfTI header" in _refusal(tmp_path, read_image, tmp_path / "meta.nii")
    assert "no DICOM image" in _refusal(tmp_path, read_image, tmp_path / "scan.vtk")
    assert set(IMAGE_SUFFIXES) == {".nii", ".nii.gz", ".nrrd", ".mha"}


@pytest.mark.parametrize(
    "name",
    ["x.nii", "x.nii.gz", "x.nrrd", "c.nrrd", "x.mha", "c.mha", "big.nii", "f.nrrd"],
)
def test_every_accepted_format_reads_the_same_voxels_as_simpleitk(tmp_path, name):
    array = volume(dtype="<f4" if name.startswith("f") else "<i2")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 4.0, 3.0))
    path = tmp_path / name
    if name == "big.nii":
        nifti(
            path,
            dtype=">i2",
            endian=">",
            data=array.astype(">i2").tobytes(),
            pixdim=[1, 0.7, 0.8, 2.5, 1, 1, 1, 1],
        )
        image = read_image(path)
    else:
        sitk.WriteImage(image, str(path), useCompression=name.startswith("c") or name.endswith(".gz"))
    header = check_image(path)
    read = read_image(path)
    assert np.array_equal(sitk.GetArrayViewFromImage(read), array)
    assert header.size == read.GetSize() == SHAPE
    assert np.allclose(header.spacing, read.GetSpacing())
    assert np.allclose(header.spacing, image.GetSpacing())


def test_limits_checked_from_the_header_before_reading(tmp_path, monkeypatch):
    path = nifti(tmp_path / "x.nii.gz", gz=True)
    assert read_image(path, max_voxels=int(np.prod(SHAPE))).GetSize() == SHAPE
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", lambda self: pytest.fail("pixels read"))
    assert "the limit is 719" in _refusal(tmp_path, read_image, path, max_voxels=719)
    assert "the limit is 719" in _refusal(tmp_path, check_image, path, max_voxels=719)


def test_gzip_bomb_checked_in_bounded_memory(tmp_path):
    bomb = gzip_bomb(tmp_path / "bomb.nii.gz", 256 * 1024**2)
    assert bomb.stat().st_size < 2 * 1024**2
    tracemalloc.start()
    try:
        assert "inflates" in _refusal(tmp_path, read_image, bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024**2, peak


def test_check_image_holds_no_full_volume(tmp_path):
    shape = (256, 256, 160)  # 40 MB of float32
    path = tmp_path / "large.nii"
    with path.open("wb") as out:
        out.write(nifti_header(shape, "<f4"))
        for z in range(shape[2]):
            out.write(np.full(shape[:2], z, "<f4").tobytes())
    tracemalloc.start()
    try:
        header = check_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert header.size == shape and header.voxels == int(np.prod(shape))
    assert peak < 16 * 1024**2, peak


def test_check_image_agrees_with_read_image(data_dir):
    for source in (data_dir / "cardiac/mscmr_lge/images/subject1_lge.nii.gz", data_dir / PROSTATE):
        header, image = check_image(source), read_image(source)
        assert header.size == image.GetSize()
        assert np.allclose(header.spacing, image.GetSpacing(), atol=1e-4)
        assert np.allclose(header.origin, image.GetOrigin(), atol=1e-3)
        assert np.allclose(header.direction, image.GetDirection(), atol=1e-4)


def test_dicom_series_reads_only_its_own_regular_files(tmp_path):
    files = dicom_series(tmp_path / "series", n=4)
    shuffled = [files[i] for i in (2, 0, 3, 1)]
    image = read_image(shuffled)
    assert image.GetSize() == (16, 16, 4)
    assert image.GetSpacing()[2] == pytest.approx(2.0)
    assert check_image(tmp_path / "series").size == (16, 16, 4)
    outside = dicom_series(tmp_path / "elsewhere", n=1)[0]
    (tmp_path / "series" / "link.dcm").symlink_to(outside)
    assert "symbolic link" in _refusal(tmp_path, read_image, tmp_path / "series")
    (tmp_path / "series" / "link.dcm").unlink()
    (tmp_path / "series" / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert "symbolic link" in _refusal(tmp_path, check_image, tmp_path / "series")


def test_metaimage_with_itk_metadata_keys_is_accepted(tmp_path):
    """SimpleITK saves a NIfTI's header fields as MetaImage keys such as ``dim[0]``: such a file is a real scan."""
    image = sitk.GetImageFromArray(np.arange(8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16))
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "scan.nii.gz")), str(tmp_path / "scan.mha"))
    assert b"dim[0]" in (tmp_path / "scan.mha").read_bytes()[:2000]
    assert check_image(tmp_path / "scan.mha").size == (16, 16, 8)
    assert read_image(tmp_path / "scan.mha").GetSize() == (16, 16, 8)
