"""How familiar each batch looks to its source network: the shift gate of test-time ``mpl``.

For every batch asked for, the source network's mean foreground entropy on each scan (model grid, as the gate
measures it, :func:`models.adaptation.scan_foreground_entropies`), the batch's mean over the card's reference (its
held-out source cases, ``validation.foreground_entropy``), and in how many of the batch's subsets of 5 and 10
scans the gate would adapt (ratio above ``AdaptConfig.shift_ratio``). No label is read. Prints a table and writes
JSON.

    .venv/bin/python -m benchmarks.shift_gate --out benchmarks/results/shift-gate.json
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, command, machine, task_bundle, task_inputs, write_json

# (task, skip, limit): each source's held-out cases, the batches of the task tables, the 10 held-back bSSFP scans
BATCHES = [
    ("acdc-acdc", 54, 6),
    ("bssfp-bssfp", 20, 5),
    ("acdc-bssfp", 0, 15),
    ("acdc-bssfp", 15, 10),
    ("acdc-lge", 0, 15),
    ("bssfp-lge", 0, 15),
]
SUBSET_SIZES = (5, 10)


def scan_entropies(task: str, skip: int, limit: int) -> tuple[dict[str, float], dict[str, float]]:
    """The task's source network's mean foreground entropy on each scan of the batch (its ONNX model, as the
    pipeline's gate runs it), and the seconds the pass over the batch took (the gate's cost) through ONNX Runtime
    and, for comparison, through eager PyTorch, with the largest difference in entropy between the two."""
    from models.adaptation import scan_foreground_entropies
    from models.inference import onnx_predictor, onnx_session, torch_predictor
    from models.pipeline import load_scans

    bundle = task_bundle(task)
    inputs, _ = task_inputs(task, skip=skip, limit=limit)
    scans = load_scans(inputs, bundle, None)
    volumes = [s.array for s in scans]
    runs = {}
    for name, predict in (
        ("onnx", onnx_predictor(onnx_session(bundle.onnx_path))),
        ("eager", torch_predictor(bundle.load_network().eval())),
    ):
        start = time.perf_counter()
        runs[name] = (
            scan_foreground_entropies(predict, volumes, bundle.card.patch_size),
            time.perf_counter() - start,
        )
    seconds = {f"{name}_s": round(s, 1) for name, (_, s) in runs.items()}
    seconds["max_entropy_difference"] = float(np.max(np.abs(np.subtract(runs["onnx"][0], runs["eager"][0]))))
    return {s.case: round(e, 4) for s, e in zip(scans, runs["onnx"][0], strict=True)}, seconds


def adapted_share(entropies: list[float], reference: float, threshold: float, size: int) -> float | None:
    """The share of the batch's subsets of ``size`` scans whose mean entropy exceeds ``threshold`` x reference."""
    if size >= len(entropies):
        return None
    values = np.asarray(entropies)
    subsets = list(itertools.combinations(range(len(values)), size))
    return round(float(np.mean([values[list(c)].mean() > threshold * reference for c in subsets])), 3)


def main() -> None:
    from models.adaptation import AdaptConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "shift-gate.json")
    args = parser.parse_args()
    threshold = AdaptConfig().shift_ratio
    rows = []
    for task, skip, limit in BATCHES:
        card = task_bundle(task).card
        reference = card.validation["foreground_entropy"]
        per_scan, cost = scan_entropies(task, skip, limit)
        mean = float(np.mean(list(per_scan.values())))
        rows.append(
            {
                "task": task,
                "skip": skip,
                "limit": limit,
                "bundle": f"{card.name}:{card.version}",
                "reference_entropy": round(reference, 4),
                "batch_entropy": round(mean, 4),
                "ratio": round(mean / reference, 3),
                "adapted": mean > threshold * reference,
                **{
                    f"adapted_share_of_{n}": adapted_share(list(per_scan.values()), reference, threshold, n)
                    for n in SUBSET_SIZES
                },
                **cost,
                "scans": per_scan,
            }
        )
        print(f"{task} --skip {skip} --limit {limit}: ratio {rows[-1]['ratio']:.2f}", flush=True)
    print(
        f"\nshift gate: adapt when the batch's foreground entropy > {threshold} x the held-out source cases'\n"
    )
    print(
        "| batch | bundle | held-out entropy | batch entropy | ratio | adapted | gate s (ONNX) | eager s | "
        + " | ".join(f"subsets of {n} adapted" for n in SUBSET_SIZES)
        + " |"
    )
    print("|" + "---|" * (8 + len(SUBSET_SIZES)))
    for r in rows:
        shares = [r[f"adapted_share_of_{n}"] for n in SUBSET_SIZES]
        print(
            f"| {r['task']} (--skip {r['skip']} --limit {r['limit']}) | {r['bundle']} | {r['reference_entropy']:.3f} "
            f"| {r['batch_entropy']:.3f} | {r['ratio']:.2f} | {'yes' if r['adapted'] else 'no'} "
            f"| {r['onnx_s']:.0f} | {r['eager_s']:.0f} | "
            + " | ".join("-" if s is None else f"{100 * s:.0f}%" for s in shares)
            + " |"
        )
    report = {
        "threshold": threshold,
        "machine": machine(),
        "command": command("benchmarks.shift_gate"),
        "batches": rows,
    }
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
