"""Accuracy and cost of test-time adaptation methods side by side on real cross-domain cardiac MRI.

For a task (source bundle -> target scans), every method adapts to the same batch and segments it in its own
process (so peak memory is per method); Dice/HD95 are computed on the target's labelled scans only, after
adaptation, by the evaluation code. Prints a table and writes JSON.

    .venv/bin/python -m benchmarks.adaptation --task bssfp-lge
    .venv/bin/python -m benchmarks.adaptation --task acdc-bssfp --methods none norm mpl --steps 40
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    RESULTS,
    ROOT,
    TASKS,
    add_task_arguments,
    command,
    label_dir,
    machine,
    task_bundle,
    task_inputs,
    write_json,
)
from models.postprocessing import LargestComponent
from models.terms import Method


def run_method(
    bundle: str,
    inputs: list[Path],
    *,
    method: str,
    steps: int | None,
    device: str,
    out: Path,
    overrides: dict,
    largest_component: str | None = None,
    flips: list[int] | None = None,
) -> dict:
    """Adapt + segment in this process; returns seconds, peak RSS and per-scan signals."""
    from models.adaptation import AdaptConfig
    from models.bundle import resolve_bundle
    from models.pipeline import segment_batch, segment_settings

    phases: dict[str, float] = {}
    start = time.perf_counter()

    def progress(phase: str, pct: float) -> None:
        if pct >= 100.0 and phase not in phases:
            phases[phase] = time.perf_counter() - start

    loaded = resolve_bundle(bundle)
    config = segment_settings(loaded.card, largest_component, AdaptConfig(**overrides), flips).adapt
    results = segment_batch(
        inputs,
        loaded,
        out_dir=out,
        method=method,
        steps=steps,
        device=device,
        progress=progress,
        adapt_config=config,
        largest_component=largest_component,
        flips=flips,
    )
    total = time.perf_counter() - start
    record = json.loads(results[0].json_path.read_text())
    return {
        "method": method,
        "adapt_config": config.model_dump(mode="json"),
        "seconds_total": round(total, 1),
        "seconds_adapt": round(phases.get("adapting", 0.0), 1),
        "seconds_segment": round(total - phases.get("adapting", 0.0), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "scans": {r.case: {"quality": r.quality, "fallback": r.fallback_reason} for r in results},
        **{
            k: record[k]
            for k in (
                "steps_run",
                "adaptation_restarts",
                "adaptation_collapsed",
                "adaptation_skipped",
                "adaptation_shift",
            )
        },
    }


def score(pred_dir: Path, label_dir: Path, labels: dict[int, str]) -> dict:
    from models.evaluation import evaluate_folders

    return evaluate_folders(pred_dir, label_dir, labels)


def signal_correlation(run: dict) -> dict[str, float]:
    """Spearman correlation, over labelled scans, between each label-free quality signal and the real Dice."""
    from scipy.stats import spearmanr

    cases = run["metrics"]["cases"]
    dice = [float(np.nanmean([m["dice"] for m in cases[c].values()])) for c in cases]
    out = {}
    for signal in next(iter(run["scans"].values()))["quality"]:
        values = [run["scans"][c]["quality"][signal] for c in cases]
        rho = spearmanr(values, dice).statistic if len(set(values)) > 1 and len(cases) > 2 else float("nan")
        out[signal] = round(float(rho), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_task_arguments(parser, limit=None)
    parser.add_argument(
        "--methods", nargs="+", choices=[m.value for m in Method], default=[m.value for m in Method]
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="adaptation steps for tent/mpl (default: shipped)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--largest-component",
        choices=[m.value for m in LargestComponent],
        default=None,
        help="connected-component clean-up (default: the bundle card's)",
    )
    parser.add_argument("--config", default="{}", help='AdaptConfig overrides as JSON, e.g. {"lr": 1e-3}')
    parser.add_argument(
        "--flips",
        type=int,
        nargs="*",
        choices=[1, 2],
        default=None,
        help="flip-ensemble axes for every method's segmentation (1: y, 2: x; none given: no flips; "
        "default: the bundle card's)",
    )
    parser.add_argument(
        "--target-spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=None,
        help="segment on this model grid (mm; 0 keeps each scan's own spacing) in place of the card's",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/<task>.json)"
    )
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "OUTDIR", "INPUTS_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    bundle = args.bundle or TASKS[args.task][0]

    if args.one:  # child process: one method
        method, outdir, inputs_json = args.one
        run = run_method(
            bundle,
            [Path(p) for p in json.loads(Path(inputs_json).read_text())],
            method=method,
            steps=args.steps,
            device=args.device,
            out=Path(outdir),
            overrides=json.loads(args.config),
            largest_component=args.largest_component,
            flips=args.flips,
        )
        print(json.dumps(run))
        return

    from models.bundle import write_card
    from models.io import case_name

    inputs, labelled = task_inputs(args.task, skip=args.skip, limit=args.limit)
    found = task_bundle(args.task, bundle)
    card = found.card
    if args.target_spacing:
        card = card.model_copy(update={"target_spacing": tuple(args.target_spacing)})
    report = {
        "task": args.task,
        "adapt_config_overrides": json.loads(args.config),
        "largest_component": args.largest_component or card.largest_component.value,
        "test_time_flips": list(card.test_time_flips if args.flips is None else args.flips),
        "bundle": f"{card.name}:{card.version}",
        "target_spacing": list(card.target_spacing),
        "batch_size": len(inputs),
        "labelled_scans": sorted(labelled & {case_name(p) for p in inputs}),
        "machine": machine(),
        "command": command("benchmarks.adaptation"),
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.target_spacing:  # the same weights on another grid: a copy of the bundle with that card
            bundle = str(shutil.copytree(found.path, Path(tmp) / "bundle"))
            write_card(card, Path(bundle))
        inputs_json = Path(tmp) / "inputs.json"
        inputs_json.write_text(json.dumps([str(p) for p in inputs]))
        for method in args.methods:
            out = Path(tmp) / method
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.adaptation",
                "--task",
                args.task,
                "--bundle",
                bundle,
                "--device",
                args.device,
                "--config",
                args.config,
                "--one",
                method,
                str(out),
                str(inputs_json),
            ]
            if args.steps is not None:
                cmd[3:3] = ["--steps", str(args.steps)]
            if args.largest_component:
                cmd += ["--largest-component", args.largest_component]
            if args.flips is not None:
                cmd += ["--flips", *map(str, args.flips)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["metrics"] = score(out, label_dir(args.task), card.labels)
            run["signal_dice_correlation"] = signal_correlation(run)
            report["methods"][method] = run
            m = run["metrics"]["mean"]["mean"]
            print(
                f"{method:5s} Dice {m['dice']:.3f} HD95 {m['hd95']:.1f} mm  {run['seconds_total']:.0f} s  "
                f"{run['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    print_table(report)
    print(f"wrote {write_json(args.out or RESULTS / f'{args.task}.json', report)}")


def print_table(report: dict) -> None:
    """Markdown table: Dice per structure, mean Dice, HD95, time and memory per method."""
    methods = report["methods"]
    structures = [s for s in next(iter(methods.values()))["metrics"]["mean"] if s != "mean"]
    head = [
        "method",
        *[f"Dice {s}" for s in structures],
        "mean Dice",
        "HD95 mm",
        "adapt s",
        "segment s",
        "peak MB",
        "fallbacks",
    ]
    print(
        f"\n{report['task']}: {report['bundle']}, batch of {report['batch_size']} scans, "
        f"Dice on {len(report['labelled_scans'])} labelled\n"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, run in methods.items():
        mean = run["metrics"]["mean"]
        fallbacks = sum(1 for s in run["scans"].values() if s["fallback"])
        row = [
            name,
            *[f"{mean[s]['dice']:.3f}" for s in structures],
            f"**{mean['mean']['dice']:.3f}**",
            f"{mean['mean']['hd95']:.1f}",
            f"{run['seconds_adapt']:.0f}",
            f"{run['seconds_segment']:.0f}",
            f"{run['peak_rss_mb']:.0f}",
            str(fallbacks),
        ]
        print("| " + " | ".join(row) + " |")
    per_case = {
        n: [np.mean([v["dice"] for v in c.values()]) for c in r["metrics"]["cases"].values()]
        for n, r in methods.items()
    }
    print(
        "\nper labelled scan, mean Dice: "
        + "; ".join(f"{n} {np.round(v, 3).tolist()}" for n, v in per_case.items())
    )
    for name, run in methods.items():
        if shift := run.get("adaptation_shift"):
            print(
                f"{name}: source foreground entropy {shift['batch_entropy']:.3f} on the batch, "
                f"{shift['reference_entropy']:.3f} held out, ratio {shift['ratio']:.2f}: "
                + ("not adapted" if run["adaptation_skipped"] else "adapted")
            )


if __name__ == "__main__":
    main()
