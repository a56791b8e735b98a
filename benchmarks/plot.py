"""Dice per labelled scan, source model vs each adaptation method, for every benchmark result JSON; and
mean Dice vs adaptation steps for every `benchmarks.adaptation_steps` JSON; and held-out source Dice vs training
hours for every `benchmarks.source_recipes` JSON (``--recipes``) and for bundles trained in stages (``--bundles``:
every stage their cards record, one after the other).

.venv/bin/python -m benchmarks.plot benchmarks/results/bssfp-lge.json benchmarks/results/acdc-bssfp.json \
    --steps benchmarks/results/acdc-bssfp-steps.json benchmarks/results/bssfp-lge-steps-batch5.json

Several steps JSONs of one task (say two learning rates) are drawn in one panel.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.bundle import ModelCard, read_card  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"none": "tab:blue", "norm": "tab:gray", "tent": "tab:orange", "mpl": "tab:red"}


def scan_dice(run: dict) -> dict[str, float]:
    """Mean foreground Dice of every labelled scan of one method's run."""
    return {
        case: float(np.nanmean([m["dice"] for m in s.values()]))
        for case, s in run["metrics"]["cases"].items()
    }


def save_figure(fig, out: Path) -> None:
    """Lay out, write and report a figure."""
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", nargs="*", type=Path, help="benchmarks.adaptation JSON files")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dice_per_scan.png")
    parser.add_argument("--steps", nargs="*", type=Path, default=[], help="adaptation_steps JSON files")
    parser.add_argument("--steps-out", type=Path, default=ROOT / "docs" / "img" / "dice_vs_steps.png")
    parser.add_argument("--recipes", nargs="*", type=Path, default=[], help="source_recipes JSON files")
    parser.add_argument(
        "--recipes-out", type=Path, default=ROOT / "docs" / "img" / "dice_vs_training_hours.png"
    )
    parser.add_argument("--bundles", nargs="*", type=Path, default=[], help="bundle folders")
    parser.add_argument(
        "--bundles-out", type=Path, default=ROOT / "docs" / "img" / "bundles_dice_vs_training_hours.png"
    )
    args = parser.parse_args()
    if args.bundles:
        plot_bundles([read_card(b) for b in args.bundles], args.bundles_out)
    if args.recipes:
        plot_recipes([json.loads(p.read_text()) for p in args.recipes], args.recipes_out)
    if args.steps:
        plot_steps([json.loads(p.read_text()) for p in args.steps], args.steps_out)
    if not args.results:
        return
    reports = [json.loads(p.read_text()) for p in args.results]
    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4), squeeze=False)
    for ax, report in zip(axes[0], reports, strict=True):
        base = scan_dice(report["methods"]["none"])
        cases = sorted(base, key=base.get)
        x = np.arange(len(cases))
        for name, run in report["methods"].items():
            dice = scan_dice(run)
            ax.plot(
                x,
                [dice[c] for c in cases],
                marker="o",
                label=name,
                color=COLOURS.get(name),
                linewidth=2 if name in ("none", "mpl") else 1,
            )
        ax.set_xticks(x, cases, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean Dice (RV, MYO, LV)")
        ax.set_title(f"{report['task']} ({report['bundle']}, batch of {report['batch_size']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, args.out)


def plot_recipes(reports: list[dict], out: Path) -> None:
    """Held-out source Dice against training hours, one curve per recipe arm, one panel per source domain; an arm
    started from masked-autoencoder weights starts after the pretraining's hours."""
    sources = list(dict.fromkeys(r["source"] for r in reports))
    fig, axes = plt.subplots(1, len(sources), figsize=(5.5 * len(sources), 3.8), squeeze=False)
    for ax, source in zip(axes[0], sources, strict=True):
        for report in (r for r in reports if r["source"] == source):
            offset = report.get("pretraining", {}).get("seconds_this_run", 0.0)
            for arm, run in report["arms"].items():
                points = [p for p in run["curve"] if "dice_mean" in p]
                ax.plot(
                    [(offset + p["seconds"]) / 3600 for p in points],
                    [p["dice_mean"] for p in points],
                    marker="o",
                    label=f"{arm} ({report['init']}, target none {run['target']['dice_mean']:.3f})",
                )
        ax.set_xlabel("training hours (this machine)")
        ax.set_ylabel("held-out source Dice")
        ax.set_title(f"source {source}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, out)


def plot_bundles(cards: list[ModelCard], out: Path) -> None:
    """Held-out source Dice against cumulative training hours of each bundle, its earlier stages first.

    A stage whose card kept no curve is drawn as its end point (hours, kept Dice) only; a dotted line marks where
    each later stage starts.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    for card in cards:
        stages = card.training_stages()
        hours, dice, offset = [], [], 0.0
        for stage in stages:
            points = [p for p in stage["curve"] if "dice_mean" in p] or [
                {"seconds": stage["seconds"], "dice_mean": stage["dice_mean"]}
            ]
            hours += [(offset + p["seconds"]) / 3600 for p in points]
            dice += [p["dice_mean"] for p in points]
            if offset:
                ax.axvline(offset / 3600, color="gray", linestyle=":", linewidth=1)
            offset += stage["seconds"]
        ax.plot(hours, dice, marker="o", label=" -> ".join(s["bundle"] for s in stages))
    ax.set_xlim(left=0)
    ax.set_xlabel("training hours, all stages (device on each card)")
    ax.set_ylabel("held-out source Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out)


def plot_steps(reports: list[dict], out: Path) -> None:
    """Mean Dice on the labelled scans after each number of adaptation steps, one panel per task.

    Runs of the same task share a panel. Each curve is labelled with its method, learning rate and batch (and
    seed, when not the shipped one); curves at the shipped learning rate and seed are solid, the others dashed
    or dotted.
    """
    from models.adaptation import AdaptConfig

    shipped = AdaptConfig()
    tasks = list(dict.fromkeys(r["task"] for r in reports))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        runs = [r for r in reports if r["task"] == task]
        curves: dict[str, dict] = {}  # one curve per label: runs with the same settings join up
        for report in runs:
            for name, run in report["methods"].items():
                key = "tent_lr" if name == "tent" else "lr"
                lr, seed = report["adapt_config"][key], report["adapt_config"]["seed"]
                label = f"{name}, lr {lr:g}, batch {report['batch_size']}" + (
                    "" if seed == shipped.seed else f", seed {seed}"
                )
                curve = curves.setdefault(
                    label, {"name": name, "shipped": lr == getattr(shipped, key) and seed == shipped.seed}
                )
                curve.setdefault("points", {}).update(
                    {int(s): point["mean_dice"] for s, point in run["curve"].items()}
                )
        other_styles = itertools.cycle(("--", ":", "-."))
        for label, curve in curves.items():
            steps = sorted(curve["points"])
            ax.plot(
                steps,
                [curve["points"][s] for s in steps],
                marker="o",
                label=label,
                color=COLOURS.get(curve["name"]),
                linestyle="-" if curve["shipped"] else next(other_styles),
            )
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("mean Dice (labelled scans)")
        ax.set_title(f"{task} ({runs[0]['bundle']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, out)


if __name__ == "__main__":
    main()
