"""Every job belongs to its client: others get 404 and never see it listed."""

from __future__ import annotations


def test_clients_are_isolated(stack, scan_dir):
    scan = sorted(scan_dir.glob("*.nii.gz"))[0]
    response = stack.submit([scan], user="alice", model="phantom", adaptation="none")
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job = stack.wait_job(job_id, user="alice")
    assert job["state"] == "succeeded"
    links = job["scans"][0]["links"]
    with stack.client("bob") as bob:
        for path in [f"/v1/jobs/{job_id}", links["segmentation"], links["volumes"], links["overlay"]]:
            answer = bob.get(path)
            assert answer.status_code == 404, (path, answer.text)
            assert "not found" in answer.json()["detail"]
        assert bob.delete(f"/v1/jobs/{job_id}").status_code == 404
        assert job_id not in [j["id"] for j in bob.get("/v1/jobs", params={"limit": 100}).json()["items"]]
    with stack.client("alice") as alice:
        assert job_id in [j["id"] for j in alice.get("/v1/jobs", params={"limit": 100}).json()["items"]]
    with stack.client(None, headers={"X-API-Key": "tok-alice-" + "a" * 24}) as by_header:
        assert by_header.get(f"/v1/jobs/{job_id}").status_code == 200
