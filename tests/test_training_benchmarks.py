"""The training benchmarks run end to end on the real cardiac scans (a few steps each): every row is trained,
scored on the labelled target scans and written, so a long run cannot fail after hours on a broken row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == returncode, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _benchmark(module: str, *args: str, returncode: int = 0) -> str:
    return _run(module, *args, returncode=returncode).stderr


def test_semi_report_counts_the_scans_each_run_changes(tmp_path):
    def run(seconds: float, **scans: dict[str, float]) -> dict:
        dice = {d: {"mean_dice": sum(s.values()) / len(s), "scans": s} for d, s in scans.items()}
        return {"steps": 10, "seconds": seconds, "dice": dice}

    before = {"ACDC": {"a": 0.5, "b": 0.6, "c": 0.7}, "bSSFP": {"d": 0.8}, "LGE": {"e": 0.7, "f": 0.7}}
    after = {"ACDC": {"a": 0.6, "b": 0.7, "c": 0.6}, "bSSFP": {"d": 0.8}, "LGE": {"e": 0.9, "f": 0.6}}
    report = {"runs": {"labelled only": run(100, **before), "semi": run(50, **after)}}
    path = tmp_path / "semi.json"
    path.write_text(json.dumps(report))
    lines = _run("benchmarks.training_semi", "--report", str(path)).stdout.splitlines()
    assert "| labelled only | 10 | 100 | 0.600 | 0.800 | 0.700 | **0.700** |" in lines
    assert "| semi | 2 / 1 of 3 | 0 / 0 of 1 | 1 / 1 of 2 |" in lines


def test_semi_report_of_a_file_it_did_not_write_is_a_usage_error(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"runs": {"labelled only": {"steps": 1}}}))
    for path in (tmp_path / "missing.json", other):
        err = _benchmark("benchmarks.training_semi", "--report", str(path), returncode=2)
        assert f"--report {path}: not a JSON this benchmark wrote" in err
        assert "Traceback" not in err


@pytest.mark.slow
def test_training_modes_benchmark_scores_every_row(data_dir, tmp_path):
    out = tmp_path / "modes.json"
    _benchmark(
        "benchmarks.training_modes",
        *("--work", str(tmp_path / "work"), "--steps", "2", "--rounds", "1", "--local-steps", "1"),
        *("--tta-steps", "1", "--tta-limit", "5", "--out", str(out)),
    )
    report = json.loads(out.read_text())
    assert list(report["rows"]) == ["test-time none", "test-time mpl", "uda", "federated"]
    assert len(report["labelled_scans"]) == 5
    for row in report["rows"].values():
        # every row starts from the shipped bundle, which segments LGE (0.76 without adaptation)
        assert 0.5 < row["mean_dice"] < 1.0
    assert report["rows"]["federated"]["bytes_per_round"] > 1e6  # the weights, both ways


@pytest.mark.slow
def test_semi_benchmark_scores_each_domain_with_the_slice_wise_plan(data_dir, tmp_path):
    out = tmp_path / "semi.json"
    _benchmark(
        "benchmarks.training_semi",
        *("--plan", "2d", "--steps", "2", "--semi-steps", "2", "--pool-limit", "1", "--score-limit", "1"),
        *("--semi-lr", "5e-4", "--batch-size", "1", "--semi-config", '{"unlabelled_weight": 0.3}'),
        *("--pool-domains", "ACDC", "LGE"),
        *("--work", str(tmp_path / "work"), "--out", str(out)),
    )
    report = json.loads(out.read_text())
    assert report["config"]["network"]["spatial_dims"] == 2
    assert set(report["unlabelled"]) == {"ACDC", "LGE"}  # --pool-domains
    assert (report["runs"]["labelled only"]["lr"], report["runs"]["semi"]["lr"]) == (2e-3, 5e-4)
    assert report["semi_config"]["unlabelled_weight"] == 0.3
    assert report["semi_config"]["unlabelled_batch_size"] == 1  # --batch-size: unlabelled scans only
    assert report["runs"]["semi"]["batch_size"] == report["runs"]["labelled only"]["batch_size"] == 16
    for run in ("labelled only", "semi"):
        dice = report["runs"][run]["dice"]
        assert set(dice) == {"ACDC", "bSSFP", "LGE"}
        assert all(0.0 <= d["mean_dice"] <= 1.0 and len(d["scans"]) == 1 for d in dice.values())

    # semi from that labelled-only bundle, without training another: the same model scores the same
    again = tmp_path / "semi-again.json"
    small = ("--semi-steps", "1", "--pool-limit", "1", "--score-limit", "1", "--batch-size", "1")
    _benchmark(
        "benchmarks.training_semi",
        *("--labelled-only", str(tmp_path / "work" / "alone-bundle"), *small),
        *("--work", str(tmp_path / "work-again"), "--out", str(again)),
    )
    second = json.loads(again.read_text())
    assert not (tmp_path / "work-again" / "alone").exists()
    assert second["runs"]["labelled only"]["dice"] == report["runs"]["labelled only"]["dice"]
    assert second["runs"]["labelled only"]["steps"] == 2 and second["runs"]["semi"]["steps"] == 1
    # a bundle trained on other scans is refused before any training
    error = _benchmark(
        "benchmarks.training_semi",
        *("--labelled-only", str(ROOT / "bundles" / "cardiac-bssfp"), *small),
        *("--work", str(tmp_path / "work-refused"), "--out", str(tmp_path / "refused.json")),
        returncode=2,
    )
    assert "was not trained on the labelled scans" in error
    assert not (tmp_path / "work-refused").exists()
    # a folder that is no bundle is a usage error, not a traceback
    error = _benchmark(
        "benchmarks.training_semi",
        *("--labelled-only", str(tmp_path), *small),
        *("--work", str(tmp_path / "work-refused"), "--out", str(tmp_path / "refused.json")),
        returncode=2,
    )
    assert "not a bundle" in error and "Traceback" not in error
    assert not (tmp_path / "work-refused").exists()
