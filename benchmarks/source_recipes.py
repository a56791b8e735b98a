"""Source-training recipes side by side: network plan x augmentation x initialisation.

Every arm is one `ttaseg train` command (the JSON records it) on the source domain's labelled scans, with the last
cases held out, from scratch, from the shipped bundle (``--init shipped``) or from masked-autoencoder weights
(``--init mae``: `ttaseg pretrain` on the source's training scans and the other domains its bundle may see, never
its held-out cases nor a domain it is tested on); it is scored in-domain (the held-out cases, the card's
validation Dice on the model grid) and on the target's labelled `val` scans without adaptation
(`benchmarks.adaptation --methods none`, original grid). The training history gives Dice against training hours.
Target labels are read for scoring only. Prints a table and writes JSON. Arms resume from their work folders, so
a killed run picks up where it stopped.

    .venv/bin/python -m benchmarks.source_recipes --source bssfp --arms 3d-gin 3d-gin-ls --steps 120
    .venv/bin/python -m benchmarks.source_recipes --source bssfp --arms 3d-gin-ls --init shipped --steps 120
    .venv/bin/python -m benchmarks.source_recipes --source bssfp --arms 2d-gin-ls-own --init mae --steps 1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import DATA, RESULTS, ROOT, command, machine, write_json
from trainer.config import PLANS, PRETRAIN_STEPS, Plan, TrainConfig
from trainer.data import image_files

EIGHT_MM, OWN_SLICES = (1.8, 1.8, 8.0), (1.8, 1.8, 0.0)
WIDE = TrainConfig().network.model_copy(update={"channels": (24, 48, 96, 192, 384)}).model_dump(mode="json")
ARMS = {
    # name: (network plan, TrainConfig fields over the plan's); every arm has GIN random convolutions
    "3d-gin": (Plan.VOLUMETRIC, {"location_scale_prob": 0.0}),
    "3d-gin-ls": (Plan.VOLUMETRIC, {"location_scale_prob": 0.5}),
    "2d-gin": (Plan.SLICE, {"location_scale_prob": 0.0, "target_spacing": EIGHT_MM}),
    "2d-gin-ls": (Plan.SLICE, {"location_scale_prob": 0.5, "target_spacing": EIGHT_MM}),
    # the scans' own slices: no slice interpolated (benchmarks.grid_ceiling); the trainer's defaults
    "2d-gin-ls-own": (Plan.SLICE, {"location_scale_prob": 0.5, "target_spacing": OWN_SLICES}),
    # the same with 1.5x the channels at every level (2.25x the weights)
    "2d-wide-gin-ls-own": (
        Plan.SLICE,
        {"location_scale_prob": 0.5, "target_spacing": OWN_SLICES, "network": WIDE},
    ),
}
SOURCES = {
    # name: (labelled source folder, held-out cases, shipped bundle, target task scored without adaptation)
    "bssfp": ("mscmr_bssfp", 5, "cardiac-bssfp", "bssfp-lge"),
    "acdc": ("acdc_cine", 6, "cardiac-acdc", "acdc-bssfp"),
}
# further unlabelled scans each source's masked-autoencoder pretraining may read: none of its bundle's test targets
# (cardiac-bssfp is tested on LGE; cardiac-acdc on bSSFP and LGE)
MAE_DOMAINS = {"bssfp": ("acdc_cine",), "acdc": ()}
TTASEG = str(ROOT / ".venv" / "bin" / "ttaseg")


def _run(cmd: list[str], log: Path) -> None:
    """Run a command from the repository root, its output (progress lines) appended to ``log``; exit with the
    log's end when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")


def prepared_data(args: argparse.Namespace, plan: Plan, fields: dict) -> Path:
    """The source's labelled scans prepared once for the arm's grid (``ttaseg prepare``)."""
    folder = SOURCES[args.source][0]
    cfg = TrainConfig.model_validate({**PLANS[plan], **fields})
    grid = {"target_spacing": cfg.target_spacing, "normalisation": cfg.normalisation.model_dump(mode="json")}
    suffix = "-".join(f"{s:g}" for s in cfg.target_spacing)
    prepared = args.work / "data" / f"{folder}-{suffix}.npz"
    if not prepared.exists():
        prepared.parent.mkdir(parents=True, exist_ok=True)
        src = DATA / "cardiac" / folder
        _run(
            [TTASEG, "prepare", "--images", str(src / "images"), "--labels", str(src / "labels")]
            + ["--label-names", str(DATA / "cardiac" / "labels.json"), "--out", str(prepared)]
            + ["--config", json.dumps(grid)],
            prepared.with_suffix(".log"),
        )
    return prepared


def mae_weights(args: argparse.Namespace, work: Path) -> dict:
    """Masked-autoencoder pretraining of the slice-wise network (``ttaseg pretrain``, resumable) on the source's
    training scans (its held-out cases left out) and ``MAE_DOMAINS``; its command, seconds and weights."""
    folder, held_out, _, _ = SOURCES[args.source]
    # the training scans: the held-out cases are the last ones by name, as in `ttaseg train --val-cases`
    own = work / "scans"
    own.mkdir(parents=True, exist_ok=True)
    scans = image_files(DATA / "cardiac" / folder / "images")
    for image in scans[: len(scans) - held_out]:
        (own / image.name).unlink(missing_ok=True)
        (own / image.name).symlink_to(image)
    folders = [own] + [DATA / "cardiac" / d / "images" for d in MAE_DOMAINS[args.source]]
    cmd = [TTASEG, "pretrain", *map(str, folders), "--work", str(work), "--steps", str(args.mae_steps)]
    cmd += ["--seed", str(args.seed)]
    start = time.perf_counter()
    print(f"masked-autoencoder pretraining, progress in {work / 'pretrain.log'}", flush=True)
    _run(cmd, work / "pretrain.log")
    return {
        "command": " ".join(cmd[1:]),
        "seconds_this_run": round(time.perf_counter() - start, 1),
        "scans": sorted(p.name for f in folders for p in image_files(f)),
        "weights": str(work / "mae.pt"),
    }


def train_arm(arm: str, args: argparse.Namespace, work: Path, init: Path | None) -> dict:
    """Train one arm from ``init`` weights or from scratch (resuming from its work folder); its command, seconds,
    validation and history."""
    _, held_out, shipped, _ = SOURCES[args.source]
    plan, fields = ARMS[arm]
    prepared = prepared_data(args, plan, fields)
    overrides = {**fields, "steps": args.steps, "val_every": args.val_every}
    if args.lr is not None:
        overrides["lr"] = args.lr
    bundle = work / "bundle"
    cmd = [
        TTASEG,
        "train",
        "--images",
        str(prepared),
        "--label-names",
        str(DATA / "cardiac" / "labels.json"),
        "--plan",
        plan,
        "--name",
        f"recipe-{arm}",
        "--out",
        str(bundle),
        "--work",
        str(work / "train"),
        "--val-cases",
        str(held_out),
        "--seed",
        str(args.seed),
        "--largest-component",
        "foreground",
        "--config",
        json.dumps(overrides),
    ]
    if init is not None:
        cmd += ["--pretrained", str(init)]
    start = time.perf_counter()
    print(f"{arm}: training, progress in {work / 'train.log'}", flush=True)
    _run(cmd, work / "train.log")
    card = json.loads((bundle / "model_card.json").read_text())
    history = json.loads((work / "train" / "history.json").read_text())
    return {
        "command": " ".join(cmd[1:]),
        "seconds_this_run": round(time.perf_counter() - start, 1),
        "training_seconds": card["training"]["seconds"],
        "in_domain": card["validation"],
        "curve": [{k: h[k] for k in ("step", "seconds", "dice_mean") if k in h} for h in history],
        "bundle": str(bundle),
    }


def score_target(bundle: str, task: str, limit: int, out: Path) -> dict:
    """Mean Dice of the bundle on the target's labelled scans without adaptation."""
    _run(
        [
            sys.executable,
            "-m",
            "benchmarks.adaptation",
            "--task",
            task,
            "--bundle",
            bundle,
            "--methods",
            "none",
            "--limit",
            str(limit),
            "--out",
            str(out),
        ],
        out.with_suffix(".log"),
    )
    metrics = json.loads(out.read_text())["methods"]["none"]["metrics"]["mean"]
    return {
        "task": task,
        "dice_mean": metrics["mean"]["dice"],
        "dice": {k: v["dice"] for k, v in metrics.items() if k != "mean"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=sorted(SOURCES), default="bssfp")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=["3d-gin", "3d-gin-ls"])
    parser.add_argument("--steps", type=int, default=120, help="training steps of every arm")
    parser.add_argument("--val-every", type=int, default=30)
    parser.add_argument(
        "--init",
        choices=["scratch", "shipped", "mae"],
        default="scratch",
        help="shipped: fine-tune the shipped bundle; mae: start from masked-autoencoder pretraining",
    )
    parser.add_argument(
        "--mae-steps", type=int, default=PRETRAIN_STEPS, help="pretraining steps (--init mae)"
    )
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the trainer's)")
    parser.add_argument("--limit", type=int, default=5, help="target scans scored (its labelled val scans)")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "recipes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    task = SOURCES[args.source][3]
    work = args.work / f"{args.source}-{args.init}-{args.steps}"
    report = {
        "source": args.source,
        "init": args.init,
        "steps": args.steps,
        "machine": machine(),
        "command": command("benchmarks.source_recipes"),
        "arms": {},
    }
    out = (
        args.out
        or RESULTS / f"source-recipes-{args.source}-{args.init}-{args.steps}-{'-'.join(args.arms)}.json"
    )
    init = None
    if args.init == "shipped":
        init = ROOT / "bundles" / SOURCES[args.source][2] / "weights.pt"
    elif args.init == "mae":
        if any(ARMS[arm][0] != Plan.SLICE for arm in args.arms):
            parser.error("--init mae pretrains the slice-wise network: choose 2d arms")
        report["pretraining"] = mae_weights(args, work / "mae")
        init = Path(report["pretraining"]["weights"])
    print(f"{'arm':<12} {'train s':>8} {'in-domain':>10} {task + ' none':>16}")
    for arm in args.arms:
        arm_work = work / arm
        run = train_arm(arm, args, arm_work, init)
        run["target"] = score_target(run["bundle"], task, args.limit, arm_work / "target.json")
        report["arms"][arm] = run
        write_json(out, report)
        print(
            f"{arm:<12} {run['training_seconds']:>8.0f} {run['in_domain'].get('dice_mean', float('nan')):>10.3f}"
            f" {run['target']['dice_mean']:>16.3f}",
            flush=True,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
