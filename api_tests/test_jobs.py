"""End-to-end job flow on the shared stack: submit, poll, results, list, cancel, registry, operations."""

from __future__ import annotations

import io
import time

import numpy as np
import SimpleITK as sitk
from PIL import Image


def test_job_lifecycle_and_results(stack, scan_dir, tmp_path):
    scans = sorted(scan_dir.glob("*.nii.gz"))[:2]
    response = stack.submit(scans, model="phantom", adaptation="tent", steps=3)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert response.headers["location"] == f"/v1/jobs/{accepted['id']}"
    assert accepted["scans"] == ["case00", "case01"]

    job = stack.wait_job(accepted["id"])
    assert job["state"] == "succeeded", job
    assert job["bundle"].startswith("phantom:") and job["bundle_used"]
    assert job["timings"]["total_seconds"] > 0 and job["timings"]["adapt_seconds"] is not None
    assert job["attempts"] == 1 and job["device"] == "cpu"
    with stack.client() as http:
        for scan, source in zip(job["scans"], scans, strict=True):
            assert scan["state"] == "succeeded" and scan["sha256"] and scan["quality"]
            seg = http.get(scan["links"]["segmentation"])
            assert seg.status_code == 200
            path = tmp_path / f"{scan['name']}.nii.gz"
            path.write_bytes(seg.content)
            label, image = sitk.ReadImage(str(path)), sitk.ReadImage(str(source))
            assert label.GetSize() == image.GetSize()
            assert np.allclose(label.GetSpacing(), image.GetSpacing())
            assert np.allclose(label.GetOrigin(), image.GetOrigin())
            assert np.allclose(label.GetDirection(), image.GetDirection())
            volumes = http.get(scan["links"]["volumes"]).json()
            assert set(volumes["volumes_ml"]) == {"core", "shell"}
            assert volumes["labels"]["1"] == "core"
            png = http.get(scan["links"]["overlay"], params={"slices": 3})
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(png.content)).size[0] == 3 * 256
        assert (
            http.get(
                f"/v1/jobs/{job['id']}/scans/case00/segmentation", params={"format": "dicom-seg"}
            ).status_code
            == 409
        )
        assert http.get(f"/v1/jobs/{job['id']}/scans/nope/volumes").status_code == 404
        assert http.delete(f"/v1/jobs/{job['id']}").status_code == 409
        listed = http.get("/v1/jobs", params={"limit": 100}).json()
        assert job["id"] in [j["id"] for j in listed["items"]]
        assert http.get("/v1/jobs", params={"state": "succeeded", "limit": 1}).json()["limit"] == 1


def test_domain_cache_reuses_adapted_bundle(stack, scan_dir):
    scans = sorted(scan_dir.glob("*.nii.gz"))
    first = stack.submit(scans[:1], model="phantom", adaptation="tent", steps=2, domain="site-A")
    assert first.status_code == 202, first.text
    first_job = stack.wait_job(first.json()["id"])
    assert first_job["state"] == "succeeded" and first_job["reused_from_job"] is None
    second = stack.submit(scans[1:2], model="phantom", adaptation="tent", domain="site-A")
    second_job = stack.wait_job(second.json()["id"])
    assert second_job["state"] == "succeeded"
    assert second_job["reused_from_job"] == first_job["id"]
    assert "site-A" in second_job["bundle_used"]
    other = stack.wait_job(
        stack.submit(
            scans[2:3], user="bob", model="phantom", adaptation="tent", steps=2, domain="site-A"
        ).json()["id"],
        user="bob",
    )
    assert other["reused_from_job"] is None  # domains are per client


def test_cancel_queued_job(stack, scan_dir):
    scans = sorted(scan_dir.glob("*.nii.gz"))
    blocker = stack.submit(scans[:1], model="phantom", adaptation="mpl", steps=40).json()["id"]
    queued = stack.submit(scans[1:2], model="phantom", adaptation="none").json()["id"]
    with stack.client() as http:
        cancelled = http.delete(f"/v1/jobs/{queued}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        stack.wait_job(blocker, until=("running",), timeout=60)
        running = http.delete(f"/v1/jobs/{blocker}").json()
        assert running["state"] == "cancelled"
    time.sleep(3)  # the worker notices at its next progress report and leaves the record alone
    assert stack.wait_job(blocker)["state"] == "cancelled"
    assert stack.wait_job(queued)["state"] == "cancelled"


def test_models_and_operations(stack):
    with stack.client() as http:
        models = http.get("/v1/models").json()
        phantom = next(m for m in models if m["name"] == "phantom")
        assert phantom["card"]["labels"] == {"0": "background", "1": "core", "2": "shell"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["worker"] == "ok"
        assert http.get("/healthz").json() == {"status": "ok"}
        metrics = http.get("/metrics").text
        for name in (
            "ttaseg_jobs{",
            "ttaseg_workers_alive",
            "ttaseg_adaptation_seconds_bucket",
            "ttaseg_inference_seconds_count",
            "ttaseg_jobs_submitted_total",
        ):
            assert name in metrics
        schema = http.get("/openapi.json").json()
        assert "multipart/form-data" in schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
