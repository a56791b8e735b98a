"""Training modes on real cross-domain cardiac MRI: ``uda`` and ``federated`` against test-time ``none``/``mpl``.

Source: the labelled bSSFP scans the task's source bundle was trained on. Target: the LGE scans without labels
(unlabelled, for training); Dice on the labelled LGE scans only, which no mode trains on. Every mode starts from
the source bundle's weights, so all rows are the same network. Prints a table and writes JSON.

    .venv/bin/python -m benchmarks.training_modes --work runs/training_modes
    .venv/bin/python -m benchmarks.training_modes --steps 2 --rounds 1 --local-steps 1 --tta-steps 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import (
    DATA,
    RESULTS,
    command,
    dice_per_scan,
    label_dir,
    machine,
    scored,
    task_bundle,
    task_inputs,
    write_json,
)
from models.terms import Method, TrainMode
from trainer.config import FederatedConfig, TrainConfig, UdaConfig

TASK = "bssfp-lge"
SOURCE = "cardiac/mscmr_bssfp"
MODES = [TrainMode.UDA.value, TrainMode.FEDERATED.value]


def prepared_data(bundle, work: Path) -> tuple[Path, Path]:
    """The source bundle's labelled training scans and the unlabelled target scans as prepared ``.npz`` files
    (made once in ``work``)."""
    from models.io import case_name
    from trainer.data import load_case, save_prepared

    card = bundle.card
    grid = {"spacing": card.target_spacing, "normalisation": card.normalisation}
    source, target = work / "source.npz", work / "target.npz"
    work.mkdir(parents=True, exist_ok=True)
    if not source.exists():
        wanted = set(card.training["train_cases"])
        images = sorted((DATA / SOURCE / "images").iterdir())
        cases = [
            load_case(p, DATA / SOURCE / "labels" / p.name, **grid, n_classes=len(card.labels))
            for p in images
            if case_name(p) in wanted
        ]
        save_prepared(cases, source, card.target_spacing, card.normalisation)
    if not target.exists():
        inputs, labelled = task_inputs(TASK)
        cases = [load_case(p, None, **grid) for p in inputs if case_name(p) not in labelled]
        save_prepared(cases, target, card.target_spacing, card.normalisation)
    return source, target


def score(net, bundle, scans) -> dict:
    """Per-scan and mean Dice of ``net`` on the labelled target scans."""
    return scored(dice_per_scan(net, scans, label_dir(TASK), bundle.card))


def run_test_time(bundle, scans, scored_scans, args: argparse.Namespace) -> dict:
    """Rows of the source bundle as shipped: no adaptation, and test-time ``mpl`` on the batch."""
    from models.adaptation import adapt
    from models.pipeline import segment_settings

    net = bundle.load_network(args.device)
    rows = {"test-time none": {**score(net, bundle, scored_scans), "seconds": 0.0}}
    start = time.perf_counter()
    adapted = adapt(
        net,
        [s.array for s in scans[: args.tta_limit]],
        bundle.card.patch_size,
        method=Method.MPL,
        steps=args.tta_steps,
        cfg=segment_settings(bundle.card).adapt,
    )
    rows["test-time mpl"] = {
        **score(adapted.net, bundle, scored_scans),
        "seconds": round(time.perf_counter() - start, 1),
        "steps": adapted.steps_run,
    }
    return rows


def test_time_rows(earlier: dict, report: dict) -> dict:
    """The test-time rows of an earlier report, refused unless it scored the same bundle, batch and scans."""
    same = ("bundle", "test_time_batch", "labelled_scans")
    if any(earlier.get(k) != report[k] for k in same) or "rows" not in earlier:
        raise SystemExit(f"--test-time-from: not the same {', '.join(same)}")
    return {
        k: {**v, "from": earlier["command"]} for k, v in earlier["rows"].items() if k.startswith("test-time")
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--work", type=Path, default=Path("runs/training_modes"), help="resumable runs")
    parser.add_argument("--steps", type=int, default=2000, help="uda: joint training steps")
    parser.add_argument("--warmup-steps", type=int, default=0, help="uda: source-only steps first")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--target-batch-size",
        type=int,
        default=UdaConfig().target_batch_size,
        help="uda and federated: target views a step (slices for a 2D plan)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="federated: segmentation rounds")
    parser.add_argument("--local-steps", type=int, default=100, help="federated: steps per site per round")
    parser.add_argument("--tta-steps", type=int, default=None, help="test-time mpl steps (default: shipped)")
    parser.add_argument(
        "--tta-limit", type=int, default=15, help="test-time mpl: batch of N LGE scans, labelled first"
    )
    parser.add_argument(
        "--test-time-from",
        type=Path,
        default=None,
        help="take the test-time rows from this earlier report of the same bundle and batch instead of rerunning",
    )
    parser.add_argument("--config", default=None, help="JSON object of further TrainConfig fields")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_modes.json")
    args = parser.parse_args()

    from models.pipeline import load_scans
    from trainer.data import load_prepared
    from trainer.federated import Site, train_federated
    from trainer.train import TrainRun
    from trainer.uda import train_uda

    bundle = task_bundle(TASK)
    card = bundle.card
    source_npz, target_npz = prepared_data(bundle, args.work / "data")
    inputs, labelled = task_inputs(TASK)
    scans = load_scans(inputs, bundle, None)
    scored_scans = [s for s in scans if s.case in labelled]
    cfg = TrainConfig.model_validate(
        {
            "target_spacing": card.target_spacing,
            "patch_size": card.patch_size,
            "network": card.network,
            "normalisation": card.normalisation,
            "steps": args.steps,
            "lr": args.lr,
            "val_every": max(1, min(250, args.steps)),
            **(json.loads(args.config) if args.config else {}),
        }
    )
    # every mode starts from the source bundle's weights
    from_source = {
        "init_weights": bundle.path / "weights.pt",
        "device": args.device,
        "largest_component": card.largest_component,
    }
    report = {
        "task": TASK,
        "bundle": bundle.ref,
        "target_training_scans": sorted(c for c in (s.case for s in scans) if c not in labelled),
        "test_time_batch": [s.case for s in scans[: args.tta_limit]],
        "labelled_scans": [s.case for s in scored_scans],
        "config": cfg.model_dump(mode="json"),
        "machine": machine(),
        "command": command("benchmarks.training_modes"),
        "rows": {},
    }
    if args.test_time_from:
        report["rows"] |= test_time_rows(json.loads(args.test_time_from.read_text()), report)
    else:
        report["rows"] |= run_test_time(bundle, scans, scored_scans, args)
    write_json(args.out, report)
    if TrainMode.UDA.value in args.modes:
        uda = UdaConfig(
            pretrain_steps=0, warmup_steps=args.warmup_steps, target_batch_size=args.target_batch_size
        )
        trained = train_uda(
            load_prepared(source_npz, card.target_spacing, card.normalisation),
            load_prepared(target_npz, card.target_spacing, card.normalisation),
            [],
            card.labels,
            TrainRun(args.work / "uda", args.work / "uda-bundle", "cardiac-bssfp-lge-uda", **from_source),
            cfg,
            uda,
            progress=lambda phase, step, status: print(f"uda {phase}: step {step} {status}", flush=True),
        )
        report["rows"]["uda"] = {
            **score(trained.load_network(), bundle, scored_scans),
            "seconds": trained.card.training["seconds"],
            "steps": args.steps,
        }
        write_json(args.out, report)
    if TrainMode.FEDERATED.value in args.modes:
        fed = FederatedConfig(
            mae_rounds=0,
            rounds=args.rounds,
            warmup_rounds=0,
            local_steps=args.local_steps,
            target_batch_size=args.target_batch_size,
        )
        sites = [
            Site(name="bssfp", images=str(source_npz), labelled=True),
            Site(name="lge", images=str(target_npz)),
        ]
        trained = train_federated(
            sites,
            card.labels,
            TrainRun(
                args.work / "federated",
                args.work / "federated-bundle",
                "cardiac-bssfp-lge-federated",
                **from_source,
            ),
            cfg,
            fed,
            progress=lambda rnd, status: print(f"federated: round {rnd} {status}", flush=True),
        )
        report["rows"]["federated"] = {
            **score(trained.load_network(), bundle, scored_scans),
            "seconds": trained.card.training["seconds"],
            "rounds": trained.card.training["rounds"],
            "bytes_per_round": trained.card.training["bytes_per_round"]["mean"],
        }
    out = write_json(args.out, report)
    print(
        f"\n{TASK}: every row starts from {bundle.ref}; mean Dice on {len(scored_scans)} labelled LGE scans\n"
    )
    print("| row | mean Dice | seconds |")
    print("|---|---|---|")
    for name, row in report["rows"].items():
        print(f"| {name} | {row['mean_dice']:.3f} | {row['seconds']:.0f} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
