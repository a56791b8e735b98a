"""Dice versus number of adaptation steps: is adaptation stable however long it runs?

Each method adapts ONCE to the task's batch, with early stopping and restarts off, keeping the adapted weights
after every requested number of steps; each snapshot then segments the labelled scans, scored against their labels
(measuring only). Prints a table and writes JSON.

    .venv/bin/python -m benchmarks.adaptation_steps --task bssfp-lge --limit 15
    .venv/bin/python -m benchmarks.adaptation_steps --task acdc-bssfp --checkpoints 0 20 40 80 120
    .venv/bin/python -m benchmarks.adaptation_steps --methods none --checkpoints 0 --bundle runs/bundles/X
    .venv/bin/python -m benchmarks.adaptation_steps --task acdc-bssfp --skip 15 --limit 10 --checkpoints 0 100

(``none`` and ``norm`` have a step-0 point only: a quick source-model score for training ablations.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    STEP_METHODS,
    add_task_arguments,
    command,
    dice_per_scan,
    label_dir,
    machine,
    scored,
    task_bundle,
    task_inputs,
    write_json,
)
from models.postprocessing import LargestComponent
from models.terms import Method


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_task_arguments(parser, limit=15)
    parser.add_argument("--methods", nargs="+", choices=[m.value for m in Method], default=STEP_METHODS)
    parser.add_argument("--checkpoints", nargs="+", type=int, default=[0, 10, 20, 40, 80, 120])
    parser.add_argument("--config", default="{}", help="AdaptConfig overrides as JSON")
    parser.add_argument(
        "--largest-component",
        choices=[m.value for m in LargestComponent],
        default=None,
        help="label-map clean-up before scoring (default: the bundle card's)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/<task>-steps.json)")
    args = parser.parse_args()

    from models.adaptation import AdaptConfig, adapt
    from models.pipeline import load_scans, segment_settings

    bundle = task_bundle(args.task, args.bundle)
    inputs, labelled = task_inputs(args.task, skip=args.skip, limit=args.limit)
    scans = load_scans(inputs, bundle, None)
    labelled_scans = [s for s in scans if s.case in labelled]
    last = max(args.checkpoints)
    # early stopping and restarts off (unless asked for): the curve must show what one run does if it runs on
    overrides = {"restarts": 0, **json.loads(args.config), "min_steps": last + 1}
    settings = segment_settings(bundle.card, args.largest_component, AdaptConfig(**overrides))
    config = settings.adapt
    report = {
        "task": args.task,
        "bundle": bundle.ref,
        "batch_size": len(scans),
        "labelled_scans": [s.case for s in labelled_scans],
        "adapt_config": config.model_dump(mode="json"),
        "test_time_flips": list(settings.flips),
        "largest_component": str(settings.largest_component),
        "machine": machine(),
        "command": command("benchmarks.adaptation_steps"),
        "methods": {},
    }
    out = args.out or RESULTS / f"{args.task}-steps.json"
    net = bundle.load_network(args.device)
    for method in args.methods:
        start = time.perf_counter()
        result = adapt(
            net, [s.array for s in scans], bundle.card.patch_size, method=method, steps=last, cfg=config,
            snapshot_steps=args.checkpoints,
        )  # fmt: skip
        curve = {}
        for step, state in sorted(result.snapshots.items()):
            result.net.load_state_dict(state)
            curve[step] = scored(
                dice_per_scan(result.net, labelled_scans, label_dir(args.task), bundle.card, settings)
            )
            print(f"{method} step {step:4d}: mean Dice {curve[step]['mean_dice']:.3f}", flush=True)
        report["methods"][method] = {
            "curve": curve,
            "seconds": round(time.perf_counter() - start, 1),
            "history": result.history,
        }
        write_json(out, report)  # kept after every method
    print(
        f"\n{args.task}: {bundle.ref}, batch of {len(scans)} scans, mean Dice on {len(labelled_scans)} labelled\n"
    )
    print("| steps | " + " | ".join(args.methods) + " |")
    print("|---|" + "---|" * len(args.methods))
    for step in sorted(args.checkpoints):
        curves = [report["methods"][m]["curve"] for m in args.methods]
        row = [f"{c[step]['mean_dice']:.3f}" if step in c else "-" for c in curves]
        print(f"| {step} | " + " | ".join(row) + " |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
