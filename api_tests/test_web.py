"""The web app in Debian's headless Chromium against the real stack: sign in, upload, follow, view, download."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, TOKENS
from PIL import Image

from models.phantom import PHANTOM_LABELS

CHROMIUM = Path("/usr/bin/chromium")
LGE_SCAN = "cardiac/mscmr_lge/images/subject29_lge.nii.gz"  # the bSSFP model segments it without adaptation
# colours of labels 1-3 (service/web/src/colours.ts)
COLOURS = {1: (230, 25, 75), 2: (60, 180, 75), 3: (0, 130, 200)}
FALLBACK_REASON = "LV myocardium volume changed 4.2x"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with software WebGL2."""
    from playwright.sync_api import sync_playwright

    assert (REPO / "service/web/dist/index.html").is_file(), "web app not built: run scripts/setup.sh"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, stack):
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=stack.base_url)
    context.set_default_timeout(90_000)  # software WebGL on a busy machine draws its first frame slowly
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors


def sign_in(page, user: str = "alice") -> None:
    page.goto("/")
    page.get_by_label("API key").fill(TOKENS[user])
    page.get_by_role("button", name="Sign in").click()
    page.locator("#submit-form").wait_for()


def colour_counts(png: bytes, tiles: int = 1) -> list[dict[int, int]]:
    """Pixels of each label colour in each of ``tiles`` side-by-side parts of a screenshot."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return [
        {k: int((np.abs(part - rgb).max(-1) <= 12).sum()) for k, rgb in COLOURS.items()}
        for part in np.array_split(pixels, tiles, axis=1)
    ]


def heat_pixels(png: bytes) -> int:
    """Pixels of the uncertainty heat map's colours (red to yellow; the scan itself is grey)."""
    r, g, b = np.moveaxis(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int), -1, 0)
    return int(((r >= 120) & (r - b >= 100) & (r >= g)).sum())


def set_opacity(page, percent: int, slider: str = "overlay-opacity") -> None:
    page.locator(f"#{slider}").evaluate(
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", percent
    )


def read_nifti(data: bytes, folder: Path):
    """A downloaded NIfTI as a SimpleITK image."""
    import SimpleITK as sitk

    path = folder / f"{len(list(folder.iterdir()))}.nii.gz"
    path.write_bytes(data)
    return sitk.ReadImage(str(path))


@pytest.fixture(scope="module")
def adapted_job(stack, scan_dir) -> dict:
    """A finished two-step ``tent`` job on a phantom: it has a source model label map besides its own."""
    response = stack.submit(
        [sorted(scan_dir.glob("*.nii.gz"))[2]], model="phantom", adaptation="tent", steps=2
    )
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"])
    assert job["state"] == "succeeded", job
    return job


def test_sign_in_upload_and_view_a_real_scan(page, stack, data_root, tmp_path):
    page.goto("/")
    assert page.url.endswith("/ui/")
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").filter(has_text="not accepted").wait_for()
    sign_in(page)
    assert page.evaluate("sessionStorage.getItem('ttaseg.key')") == TOKENS["alice"]

    model = page.locator("#model option[value^='cardiac-bssfp']").get_attribute("value")
    page.locator("#files").set_input_files(str(data_root / LGE_SCAN))
    page.get_by_label("Model").select_option(model)
    page.get_by_label("Adaptation method").select_option("none")
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url("**/ui/#/jobs/*")
    job_id = page.url.rsplit("/", 1)[1]
    assert TOKENS["alice"] not in page.url

    viewer = page.locator(".viewer[data-ready]")
    viewer.wait_for(timeout=300_000)
    assert viewer.get_attribute("data-ready") == "true", page.locator(".viewer").inner_text()
    with stack.client() as http:
        card = next(m for m in http.get("/v1/models").json() if m["ref"] == model)["card"]
        label_bytes = http.get(f"/v1/jobs/{job_id}/scans/subject29_lge/segmentation").content
    names = [card["labels"][k] for k in sorted(card["labels"], key=int) if k != "0"]
    assert page.locator(".legend label").all_inner_texts() == names
    assert page.locator(".scan table").first.locator("tbody tr td:first-child").all_inner_texts() == names
    page.get_by_text("Adaptation (none): 0 steps").wait_for()

    # the overlay, fully opaque, in three planes that cross at the heart: the left ventricle in each plane,
    # every structure's colour on the canvas
    canvas = page.locator("#viewer-canvas")
    set_opacity(page, 100)
    page.wait_for_timeout(300)
    planes = colour_counts(canvas.screenshot(), tiles=3)
    assert all(plane[3] > 40 for plane in planes), planes
    (drawn,) = colour_counts(canvas.screenshot())
    assert all(n > 40 for n in drawn.values()), drawn
    page.get_by_label(names[1]).uncheck()
    page.wait_for_timeout(300)
    (hidden,) = colour_counts(canvas.screenshot())
    assert hidden[2] < drawn[2] / 20 and hidden[1] > 40 and hidden[3] > 40, (drawn, hidden)

    # `none` has no other label map to show; the uncertainty heat map draws over the scan
    assert page.get_by_label("Source model").is_disabled()
    page.get_by_text("This job did not adapt").wait_for()
    set_opacity(page, 0)
    page.wait_for_timeout(300)
    grey = heat_pixels(canvas.screenshot())
    page.get_by_label("Show as heat map").check()
    page.locator(".viewer[data-uncertainty='shown']").wait_for()
    set_opacity(page, 100, "uncertainty-opacity")
    page.wait_for_timeout(300)
    heat = heat_pixels(canvas.screenshot())
    assert heat > max(200, 10 * grey), (grey, heat)
    page.get_by_label("Show as heat map").uncheck()
    page.wait_for_timeout(300)
    assert heat_pixels(canvas.screenshot()) < heat / 10

    with page.expect_download() as download:
        page.get_by_role("button", name="Label map (NIfTI)").click()
    assert Path(download.value.path()).read_bytes() == label_bytes

    page.get_by_role("link", name="← All jobs").click()
    row = page.locator("#jobs tr", has=page.get_by_role("link", name=job_id[:8]))
    row.get_by_text("succeeded").wait_for()


def test_switch_between_the_adapted_and_the_source_label_map(page, stack, adapted_job):
    """The viewer swaps the drawn label map for the source model's and back."""
    import SimpleITK as sitk

    scan = adapted_job["scans"][0]["name"]
    results = stack.root / "data" / "storage" / "jobs" / adapted_job["id"] / "results"
    # a source label map that surely differs from the adapted one: a central box of its rarest label
    adapted = sitk.ReadImage(str(results / f"{scan}.nii.gz"))
    labels = sitk.GetArrayFromImage(adapted)
    box = tuple(slice(n // 5, n - n // 5) for n in labels.shape)
    rare = min((k for k in PHANTOM_LABELS if k), key=lambda k: int((labels[box] == k).sum()))
    source = np.zeros_like(labels)
    source[box] = rare
    image = sitk.GetImageFromArray(source)
    image.CopyInformation(adapted)
    sitk.WriteImage(image, str(results / f"{scan}_source.nii.gz"))

    sign_in(page)
    page.goto(f"/ui/#/jobs/{adapted_job['id']}/{scan}")
    page.locator(".viewer[data-ready='true']").wait_for()
    canvas = page.locator("#viewer-canvas")
    set_opacity(page, 100)
    page.wait_for_timeout(300)
    (own,) = colour_counts(canvas.screenshot())
    page.get_by_label("Source model").check()
    page.locator(".viewer[data-model='source']").wait_for()
    page.wait_for_timeout(300)
    (other,) = colour_counts(canvas.screenshot())
    assert other[rare] > max(500, 3 * own[rare]), (rare, own, other)
    page.get_by_label("Adapted model").check()
    page.locator(".viewer[data-model='adapted']").wait_for()
    page.wait_for_timeout(300)
    (back,) = colour_counts(canvas.screenshot())
    assert back[rare] < other[rare] / 2, (own, back)


def test_fallback_badge_and_other_clients(page, stack, scan_dir):
    """A scan the guard sent back to the source model shows the badge and the reason; Bob sees none of it."""
    response = stack.submit([sorted(scan_dir.glob("*.nii.gz"))[0]], model="phantom", adaptation="none")
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"])
    assert job["state"] == "succeeded", job
    # `none` never falls back: record the guard's decision as a worker would, for the page to show it
    with sqlite3.connect(stack.root / "data" / "ttaseg.db") as db:
        db.execute(
            "UPDATE scans SET fallback = 1, fallback_reason = ? WHERE job_id = ?",
            (FALLBACK_REASON, job["id"]),
        )
    sign_in(page)
    page.locator(".dropzone").evaluate(
        """zone => {
            const files = new DataTransfer();
            files.items.add(new File(["x"], "dropped.nii.gz"));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true }));
        }"""
    )
    assert page.locator(".files li").inner_text().startswith("dropped.nii.gz")
    page.goto(f"/ui/#/jobs/{job['id']}")
    page.locator(".fallback", has_text=FALLBACK_REASON).get_by_text("Fallback: source model").wait_for()
    page.get_by_text("1 of 1 scans").wait_for()

    page.get_by_role("button", name="Sign out").click()
    sign_in(page, "bob")
    page.locator("#jobs").get_by_text("Loading…").wait_for(state="detached")
    assert page.get_by_role("link", name=job["id"][:8]).count() == 0
    page.goto(f"/ui/#/jobs/{job['id']}")
    page.get_by_role("alert").filter(has_text="No such job").wait_for()


def test_viewer_routes(stack, scan_dir, adapted_job, tmp_path):
    """The input as NIfTI (as uploaded, or converted from MHA), the result record, the uncertainty map and the
    source model's label map, for the owner only."""
    import SimpleITK as sitk

    source = sorted(scan_dir.glob("*.nii.gz"))[1]
    mha = tmp_path / "converted.mha"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(mha))
    response = stack.submit([source, mha], model="phantom", adaptation="none")
    assert response.status_code == 202, response.text
    job = stack.wait_job(response.json()["id"])
    nifti_scan, mha_scan = (f"/v1/jobs/{job['id']}/scans/{s['name']}" for s in job["scans"])
    with stack.client() as http:
        image = http.get(f"{nifti_scan}/image")
        assert image.status_code == 200 and image.content == source.read_bytes()
        converted = tmp_path / "converted.nii.gz"
        converted.write_bytes(http.get(f"{mha_scan}/image").content)
        assert np.array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(converted))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(mha))),
        )
        report = http.get(f"{nifti_scan}/report").json()
        assert report["method"] == "none" and report["steps_run"] == 0 and report["fallback"] is False
        assert not {"label_path", "json_path", "source_label_file", "uncertainty_file"} & set(report)
        uncertainty = read_nifti(http.get(f"{nifti_scan}/uncertainty").content, tmp_path)
        assert uncertainty.GetSize() == sitk.ReadImage(str(source)).GetSize()
        assert http.get(f"{nifti_scan}/source-segmentation").status_code == 409
        assert "source_segmentation" not in job["scans"][0]["links"]

        scan = adapted_job["scans"][0]
        grid = sitk.ReadImage(str(scan_dir / f"{scan['name']}.nii.gz"))
        labels = read_nifti(http.get(scan["links"]["source_segmentation"]).content, tmp_path)
        uncertainty = read_nifti(http.get(scan["links"]["uncertainty"]).content, tmp_path)
        for image in (labels, uncertainty):
            assert image.GetSize() == grid.GetSize() and image.GetOrigin() == pytest.approx(grid.GetOrigin())
        assert set(np.unique(sitk.GetArrayFromImage(labels))) <= set(PHANTOM_LABELS)
        values = sitk.GetArrayFromImage(uncertainty)
        assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1
        paths = http.get("/openapi.json").json()["paths"]
        viewer_paths = {
            f"/v1/jobs/{{job_id}}/scans/{{scan}}/{name}"
            for name in ("image", "report", "uncertainty", "source-segmentation")
        }
        assert viewer_paths <= set(paths)
    owned = [f"{nifti_scan}/image", f"{nifti_scan}/report", scan["links"]["uncertainty"]]
    owned.append(scan["links"]["source_segmentation"])
    with stack.client("bob") as http:
        assert all(http.get(url).status_code == 404 for url in owned)
    assert all(httpx.get(f"{stack.base_url}{url}").status_code == 401 for url in owned)


def test_unbuilt_app_says_how_to_build_it(tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(data_dir=tmp_path, web_dist=tmp_path / "dist"))
    answer = TestClient(app).get("/ui/")
    assert answer.status_code == 503 and "scripts/setup.sh" in answer.text
