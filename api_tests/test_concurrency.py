"""Twenty clients posting at once: all accepted (or refused with Retry-After), and all finish."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scan_files import write_array


def test_twenty_concurrent_clients(stack, tmp_path):
    rng = np.random.default_rng(7)
    scans = [
        write_array(
            tmp_path / f"tiny{i:02d}.nii.gz", (rng.random((6, 24, 24)) * 1000).astype(np.int16), (1.5, 1.5, 3)
        )
        for i in range(20)
    ]

    def post(i: int) -> tuple[int, dict, dict]:
        user = "alice" if i % 2 else "bob"
        for _ in range(30):
            response = stack.submit([scans[i]], user=user, model="phantom", adaptation="none")
            if response.status_code in (429, 503):
                assert int(response.headers["retry-after"]) > 0
                time.sleep(1)
                continue
            return response.status_code, response.json(), {"user": user}
        raise AssertionError("never accepted")

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(post, range(20)))
    assert [code for code, _, _ in answers] == [202] * 20, answers
    ids = {body["id"] for _, body, _ in answers}
    assert len(ids) == 20
    for _, body, who in answers:
        job = stack.wait_job(body["id"], user=who["user"], timeout=300)
        assert job["state"] == "succeeded", job
