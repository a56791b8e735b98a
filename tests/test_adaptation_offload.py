"""The split steps benchmark: pack here, adapt where only torch is, score and check here; step 0 is the source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _table_dice(case: str) -> float:
    """The committed source model's mean Dice on ``case`` in the bssfp-lge table's ``none`` column."""
    report = json.loads((ROOT / "benchmarks/results/bssfp-lge.json").read_text())
    structures = report["methods"]["none"]["metrics"]["cases"][case].values()
    return sum(s["dice"] for s in structures) / len(structures)


def _offload(*args: str) -> None:
    cmd = [sys.executable, "-m", "benchmarks.adaptation_offload", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def packed(data_dir, tmp_path_factory) -> Path:
    """subject1's LGE scan packed for adaptation away from the imaging stack."""
    packed = tmp_path_factory.mktemp("offload") / "packed"
    _offload("pack", "--task", "bssfp-lge", "--limit", "1", "--out", str(packed))
    return packed


def test_pack_adapt_score_round_trip(packed, tmp_path):
    snapshots, out = tmp_path / "snapshots", tmp_path / "curve.json"
    card = json.loads((packed / "batch.json").read_text())
    assert card["cases"] == card["labelled_scans"] == ["subject1_lge"]
    _offload("adapt", str(packed), "--checkpoints", "1", "--device", "cpu", "--snapshots", str(snapshots))
    assert sorted(p.name for p in snapshots.iterdir()) == ["adapt.json", "mpl-1.pt"]
    _offload("score", str(packed), str(snapshots), "--out", str(out))
    curve = json.loads(out.read_text())["methods"]["mpl"]["curve"]
    assert sorted(curve, key=int) == ["0", "1"]
    # step 0 is the committed source model: subject1's Dice in the bssfp-lge table's `none` column
    assert abs(curve["0"]["scans"]["subject1_lge"] - _table_dice("subject1_lge")) < 0.005
    assert abs(curve["1"]["mean_dice"] - curve["0"]["mean_dice"]) < 0.05
    _offload("collapse", str(packed), str(snapshots), "--out", str(tmp_path / "collapse.json"))
    (row,) = json.loads((tmp_path / "collapse.json").read_text())["snapshots"]
    assert row["collapsed"] == [] and row["scans_shrunk"] == [0, 0, 0]  # one step keeps the heart
    assert row["scans_with_structure"][1:] == [1, 1]  # the source model finds the myocardium and LV cavity


def test_sweep_scores_every_seed_and_their_ensemble_against_the_source(packed, tmp_path):
    sweep, out = tmp_path / "sweep", tmp_path / "sweep.json"
    grid = ["base={}", 'flips={"teacher_flips": [2]}']
    _offload("sweep", str(packed), "--grid", *grid, "--seeds", "3", "4", "--checkpoints", "1", "--device", "cpu",
             "--half", "--snapshots", str(sweep))  # fmt: skip
    runs = sorted(p.name for p in sweep.iterdir())
    assert runs == ["base-seed3", "base-seed4", "flips-seed3", "flips-seed4"]
    run = json.loads((sweep / "flips-seed4" / "adapt.json").read_text())
    assert run["adapt_config"]["seed"] == 4 and run["adapt_config"]["teacher_flips"] == [2]
    state = torch.load(sweep / "flips-seed4" / "mpl-1.pt", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    _offload("score-sweep", str(packed), str(sweep), "--out", str(out))
    report = json.loads(out.read_text())
    source = report["none"]["scans"]["subject1_lge"]  # the committed source model
    assert abs(source - _table_dice("subject1_lge")) < 0.005
    for name, overrides in (("base", {}), ("flips", {"teacher_flips": [2]})):
        row = report["settings"][name]
        assert row["overrides"] == overrides and sorted(row["seeds"]) == ["3", "4"]
        dice = [seed["mean_dice"] for seed in row["seeds"].values()]
        assert abs(row["mean_over_seeds"] - sum(dice) / 2) < 1e-3
        assert abs(row["ensemble_of_seeds"]["mean_dice"] - report["none"]["mean_dice"]) < 0.05
