"""The split steps benchmark: pack here, adapt where only torch is, score and check here; step 0 is the source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _offload(*args: str) -> None:
    cmd = [sys.executable, "-m", "benchmarks.adaptation_offload", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_pack_adapt_score_round_trip(data_dir, tmp_path):
    packed, snapshots, out = tmp_path / "packed", tmp_path / "snapshots", tmp_path / "curve.json"
    _offload("pack", "--task", "bssfp-lge", "--limit", "1", "--out", str(packed))
    card = json.loads((packed / "batch.json").read_text())
    assert card["cases"] == card["labelled_scans"] == ["subject1_lge"]
    _offload("adapt", str(packed), "--checkpoints", "1", "--device", "cpu", "--snapshots", str(snapshots))
    assert sorted(p.name for p in snapshots.iterdir()) == ["adapt.json", "mpl-1.pt"]
    _offload("score", str(packed), str(snapshots), "--out", str(out))
    curve = json.loads(out.read_text())["methods"]["mpl"]["curve"]
    assert sorted(curve, key=int) == ["0", "1"]
    # step 0 is the committed source model: subject1's Dice in the bssfp-lge table's `none` column
    assert abs(curve["0"]["scans"]["subject1_lge"] - 0.674) < 0.005
    assert abs(curve["1"]["mean_dice"] - curve["0"]["mean_dice"]) < 0.05
    _offload("collapse", str(packed), str(snapshots), "--out", str(tmp_path / "collapse.json"))
    (row,) = json.loads((tmp_path / "collapse.json").read_text())["snapshots"]
    assert row["collapsed"] == [] and row["scans_shrunk"] == [0, 0, 0]  # one step keeps the heart
    assert row["scans_with_structure"][1:] == [1, 1]  # the source model finds the myocardium and LV cavity
