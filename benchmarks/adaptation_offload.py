"""Dice versus adaptation steps, with the adaptation run on a machine that has no imaging stack (a GPU host).

The same measurement as ``benchmarks.adaptation_steps``, split in three so that only the adaptation needs the
accelerator and only torch, MONAI and pydantic there:

    # 1. here: read, resample and normalise the task's batch (SimpleITK) into one folder
    python -m benchmarks.adaptation_offload pack --task bssfp-lge --limit 15 --out runs/offload/bssfp-lge
    # 2. on the GPU host: adapt to the packed batch, keep the weights after each checkpoint
    python -m benchmarks.adaptation_offload adapt runs/offload/bssfp-lge --checkpoints 100 300 --device cuda \\
        --snapshots runs/offload/bssfp-lge-mpl
    # 3. here: segment the labelled scans with every snapshot (step 0: the source weights) and score them
    python -m benchmarks.adaptation_offload score runs/offload/bssfp-lge runs/offload/bssfp-lge-mpl \\
        --out benchmarks/results/bssfp-lge-mpl-steps-gpu.json

``adapt`` writes ``adapt.json`` (settings, seconds, seconds per step, peak GPU memory, the label-free history) and
one ``<method>-<step>.pt`` per checkpoint; ``score`` adds the curves and writes the same JSON layout as
``benchmarks.adaptation_steps``. Early stopping and restarts are off, as there. ``collapse`` applies ``mpl``'s
restart rule (``models.adaptation.collapsed_structures``) to the snapshots, without labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.adaptation import DATA, TASKS, machine

BATCH_FILE, CARD_FILE, WEIGHTS_FILE, ADAPT_FILE = "batch.npz", "batch.json", "weights.pt", "adapt.json"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _source_network(packed: Path, card: dict):
    """The packed source network (CPU, eval mode)."""
    from models.network import GlobalLocalUNet, NetworkConfig

    net = GlobalLocalUNet(NetworkConfig(**card["network"]))
    net.load_state_dict(_weights(packed / WEIGHTS_FILE))
    return net.eval()


def _volumes(packed: Path, card: dict) -> list[np.ndarray]:
    """The packed batch on the model grid, in the card's order."""
    with np.load(packed / BATCH_FILE) as batch:
        return [batch[c] for c in card["cases"]]


def pack(args: argparse.Namespace) -> None:
    """Prepare the task's batch on the model grid and save it with the source weights and settings."""
    from models.bundle import resolve_bundle
    from models.io import case_name
    from models.pipeline import clean_up_settings, load_scans

    bundle_name, image_rel, label_rel = TASKS[args.task]
    bundle = resolve_bundle(args.bundle or bundle_name)
    labelled = {case_name(p) for p in (DATA / label_rel).iterdir()}
    inputs = sorted((DATA / image_rel).iterdir(), key=lambda p: (case_name(p) not in labelled, p.name))
    scans = load_scans(inputs[args.skip : args.skip + args.limit], bundle, None)
    largest_component, config = clean_up_settings(bundle.card, None, None)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / BATCH_FILE, **{s.case: s.array for s in scans})
    torch.save(bundle.load_network().state_dict(), args.out / WEIGHTS_FILE)
    card = {
        "task": args.task,
        "bundle": bundle.ref,
        "cases": [s.case for s in scans],
        "inputs": [str(p) for p in inputs[args.skip : args.skip + args.limit]],
        "labelled_scans": [s.case for s in scans if s.case in labelled],
        "patch_size": list(bundle.card.patch_size),
        "network": bundle.card.network.model_dump(mode="json"),
        "largest_component": str(largest_component),
        "adapt_config": config.model_dump(mode="json"),
    }
    (args.out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"packed {len(scans)} scans of {args.task} ({bundle.ref}) into {args.out}: {size:.1f} MiB")


def adapt_packed(args: argparse.Namespace) -> None:
    """Adapt the packed source weights to the packed batch; save the snapshots and the timings."""
    from models.adaptation import AdaptConfig, adapt

    card = json.loads((args.packed / CARD_FILE).read_text())
    volumes = _volumes(args.packed, card)
    net = _source_network(args.packed, card).to(args.device)
    last = max(args.checkpoints)
    overrides = json.loads(args.config)
    config = AdaptConfig(**{**card["adapt_config"], "restarts": 0, **overrides, "min_steps": last + 1})
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = adapt(
        net, volumes, card["patch_size"], args.method, last, config, snapshot_steps=args.checkpoints
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    args.snapshots.mkdir(parents=True, exist_ok=True)
    for step, state in result.snapshots.items():
        if step:  # step 0 is the packed source weights
            torch.save({k: v.cpu() for k, v in state.items()}, args.snapshots / f"{args.method}-{step}.pt")
    report = {
        "task": card["task"],
        "bundle": card["bundle"],
        "batch_size": len(volumes),
        "method": args.method,
        "steps": last,
        "adapt_config": config.model_dump(mode="json"),
        "config_overrides": overrides,
        "device": args.device,
        "machine": machine(),
        "command": " ".join(["python -m benchmarks.adaptation_offload", *sys.argv[1:]]),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(last, 1), 4),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "history": result.history,
    }
    (args.snapshots / ADAPT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.method}: {last} steps in {seconds:.1f} s ({report['seconds_per_step'] * 1e3:.0f} ms/step)")


def score(args: argparse.Namespace) -> None:
    """Score the source weights and every snapshot on the labelled scans; print a table and write JSON."""
    from benchmarks.adaptation_steps import dice_per_scan
    from models.bundle import resolve_bundle
    from models.io import case_name
    from models.pipeline import load_scans
    from models.postprocessing import LargestComponent

    card = json.loads((args.packed / CARD_FILE).read_text())
    run = json.loads((args.snapshots / ADAPT_FILE).read_text())
    bundle = resolve_bundle(card["bundle"])
    label_dir = DATA / TASKS[card["task"]][2]
    labelled = set(card["labelled_scans"])
    scans = load_scans([p for p in card["inputs"] if case_name(p) in labelled], bundle, None)
    net = _source_network(args.packed, card)
    method = run["method"]
    weights = {0: args.packed / WEIGHTS_FILE} | {
        int(p.stem.rsplit("-", 1)[1]): p for p in args.snapshots.glob(f"{method}-*.pt")
    }
    curve = {}
    for step, path in sorted(weights.items()):
        net.load_state_dict(_weights(path))
        per_scan = dice_per_scan(
            net,
            scans,
            label_dir,
            card["patch_size"],
            bundle.card.labels,
            LargestComponent(card["largest_component"]),
        )
        curve[step] = {"mean_dice": round(float(np.mean(list(per_scan.values()))), 4), "scans": per_scan}
        print(f"{method} step {step:4d}: mean Dice {curve[step]['mean_dice']:.3f}", flush=True)
    report = {
        **{k: run[k] for k in ("task", "bundle", "batch_size", "adapt_config", "device")},
        "labelled_scans": card["labelled_scans"],
        "largest_component": card["largest_component"],
        "adapted_on": run["machine"],
        "scored_on": machine(),
        "command": [run["command"], " ".join(["python -m benchmarks.adaptation_offload", *sys.argv[1:]])],
        "methods": {
            method: {
                "curve": curve,
                "seconds": run["seconds"],
                "seconds_per_step": run["seconds_per_step"],
                "peak_gpu_memory_mib": run["peak_gpu_memory_mib"],
                "history": run["history"],
            }
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{card['task']}: {card['bundle']}, batch of {run['batch_size']}, {method} on {run['device']}\n")
    print("| steps | mean Dice |\n|---|---|")
    for step, point in curve.items():
        print(f"| {step} | {point['mean_dice']:.3f} |")
    print(f"wrote {args.out}")


def collapse(args: argparse.Namespace) -> None:
    """The restart rule on every snapshot of some adapt runs: which structures collapsed, in how many scans."""
    from models.adaptation import AdaptConfig, collapsed_structures, shrunk_scans, structure_shares

    rule = AdaptConfig()
    card = json.loads((args.packed / CARD_FILE).read_text())
    volumes = _volumes(args.packed, card)
    net = _source_network(args.packed, card)
    source = structure_shares(net, volumes, card["patch_size"])
    rows = []
    print(
        f"| snapshot | collapsed | scans shrunk > {rule.collapse_ratio:g}x per structure | scans with the structure |"
        "\n|---|---|---|---|"
    )
    for path in [p for folder in args.snapshots for p in sorted(folder.glob("*-*.pt"))]:
        net.load_state_dict(_weights(path))
        adapted = structure_shares(net, volumes, card["patch_size"])
        shrunk, present = shrunk_scans(source, adapted, rule)
        row = {
            "snapshot": str(path),
            "collapsed": collapsed_structures(source, adapted, rule),
            "scans_shrunk": shrunk.tolist(),
            "scans_with_structure": present.tolist(),
        }
        rows.append(row)
        print(f"| {path} | {row['collapsed']} | {row['scans_shrunk']} | {row['scans_with_structure']} |")
    report = {
        "task": card["task"],
        "command": " ".join(["python -m benchmarks.adaptation_offload", *sys.argv[1:]]),
        "rule": rule.model_dump(include={"collapse_ratio", "collapse_scans"}),
        "snapshots": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("pack", help="prepare a task's batch into a folder")
    p.add_argument("--task", choices=sorted(TASKS), default="bssfp-lge")
    p.add_argument("--bundle", default=None, help="bundle name or folder (default: the task's)")
    p.add_argument(
        "--limit", type=int, default=15, help="batch: N target scans (after --skip), labelled first"
    )
    p.add_argument("--skip", type=int, default=0, help="leave out the first N target scans")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=pack)
    a = sub.add_parser("adapt", help="adapt to a packed batch, keeping snapshots")
    a.add_argument("packed", type=Path)
    a.add_argument("--method", choices=["tent", "mpl"], default="mpl")
    a.add_argument("--checkpoints", nargs="+", type=int, required=True)
    a.add_argument("--config", default="{}", help="AdaptConfig overrides as JSON")
    a.add_argument("--device", default="cuda", help="cuda or cpu")
    a.add_argument("--snapshots", type=Path, required=True, help="folder for the snapshots and adapt.json")
    a.set_defaults(run=adapt_packed)
    s = sub.add_parser("score", help="score the snapshots of one adapt run")
    s.add_argument("packed", type=Path)
    s.add_argument("snapshots", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(run=score)
    c = sub.add_parser("collapse", help="the restart rule on every snapshot of some adapt runs (label-free)")
    c.add_argument("packed", type=Path)
    c.add_argument("snapshots", type=Path, nargs="+")
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(run=collapse)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
