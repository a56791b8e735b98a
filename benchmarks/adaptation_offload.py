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

Settings side by side, several seeds each, in one process on the GPU host, then scored here (each seed, and the
mean of the seeds' probabilities as an ensemble):

    python -m benchmarks.adaptation_offload sweep runs/offload/bssfp-lge --seeds 0 1 2 --half \\
        --grid base='{}' block8='{"mask_block": [2, 8, 8]}' --snapshots runs/offload/sweep/bssfp-lge
    python -m benchmarks.adaptation_offload score-sweep runs/offload/bssfp-lge runs/offload/sweep/bssfp-lge \\
        --out benchmarks/results/bssfp-lge-mpl-sweep-gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common
from models.terms import Method

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
    from models.pipeline import load_scans, segment_settings

    bundle = common.task_bundle(args.task, args.bundle)
    inputs, labelled = common.task_inputs(args.task, skip=args.skip, limit=args.limit)
    scans = load_scans(inputs, bundle, None)
    settings = segment_settings(bundle.card)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / BATCH_FILE, **{s.case: s.array for s in scans})
    torch.save(bundle.load_network().state_dict(), args.out / WEIGHTS_FILE)
    card = {
        "task": args.task,
        "bundle": bundle.ref,
        "cases": [s.case for s in scans],
        "inputs": [str(p) for p in inputs],
        "labelled_scans": [s.case for s in scans if s.case in labelled],
        "patch_size": list(bundle.card.patch_size),
        "network": bundle.card.network.model_dump(mode="json"),
        "largest_component": str(settings.largest_component),
        "adapt_config": settings.adapt.model_dump(mode="json"),
    }
    common.write_json(args.out / CARD_FILE, card)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"packed {len(scans)} scans of {args.task} ({bundle.ref}) into {args.out}: {size:.1f} MiB")


def _adapt_run(
    packed: Path,
    card: dict,
    volumes: list[np.ndarray],
    *,
    method: str,
    checkpoints: list[int],
    overrides: dict,
    device: str,
    out: Path,
    half: bool = False,
) -> dict:
    """Adapt the packed source weights to the packed batch; save the snapshots (in half precision when asked) and
    ``adapt.json`` with the timings into ``out``."""
    from models.adaptation import AdaptConfig, adapt

    net = _source_network(packed, card).to(device)
    last = max(checkpoints)
    config = AdaptConfig(**{**card["adapt_config"], "restarts": 0, **overrides, "min_steps": last + 1})
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = adapt(
        net, volumes, card["patch_size"], method=method, steps=last, cfg=config, snapshot_steps=checkpoints
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    for step, state in result.snapshots.items():
        if step:  # step 0 is the packed source weights
            state = {k: (v.half() if half and v.is_floating_point() else v).cpu() for k, v in state.items()}
            torch.save(state, out / f"{method}-{step}.pt")
    report = {
        "task": card["task"],
        "bundle": card["bundle"],
        "batch_size": len(volumes),
        "method": method,
        "steps": last,
        "adapt_config": config.model_dump(mode="json"),
        "config_overrides": overrides,
        "device": device,
        "machine": common.machine(),
        "command": common.command("benchmarks.adaptation_offload"),
        "snapshots_in_half_precision": half,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(last, 1), 4),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        "history": result.history,
    }
    common.write_json(out / ADAPT_FILE, report)
    print(
        f"{out.name}: {last} steps in {seconds:.1f} s ({report['seconds_per_step'] * 1e3:.0f} ms/step)",
        flush=True,
    )
    return report


def adapt_packed(args: argparse.Namespace) -> None:
    """Adapt the packed source weights to the packed batch; save the snapshots and the timings."""
    card = json.loads((args.packed / CARD_FILE).read_text())
    volumes = _volumes(args.packed, card)
    _adapt_run(
        args.packed,
        card,
        volumes,
        method=args.method,
        checkpoints=args.checkpoints,
        overrides=json.loads(args.config),
        device=args.device,
        out=args.snapshots,
    )


def sweep(args: argparse.Namespace) -> None:
    """Adapt once per setting and seed: ``<snapshots>/<name>-seed<seed>/``, each as ``adapt`` writes it."""
    card = json.loads((args.packed / CARD_FILE).read_text())
    volumes = _volumes(args.packed, card)
    grid = dict(item.split("=", 1) for item in args.grid)
    for name, overrides in grid.items():
        for seed in args.seeds:
            _adapt_run(
                args.packed,
                card,
                volumes,
                method=args.method,
                checkpoints=args.checkpoints,
                overrides={**json.loads(overrides), "seed": seed},
                device=args.device,
                out=args.snapshots / f"{name}-seed{seed}",
                half=args.half,
            )


def _labelled(packed: Path, card: dict):
    """The task's bundle, its labelled scans read as the pipeline reads them, and their label folder."""
    from models.io import case_name
    from models.pipeline import load_scans

    bundle = common.task_bundle(card["task"], card["bundle"])
    labelled = set(card["labelled_scans"])
    scans = load_scans([p for p in card["inputs"] if case_name(p) in labelled], bundle, None)
    return bundle, scans, common.label_dir(card["task"])


def score(args: argparse.Namespace) -> None:
    """Score the source weights and every snapshot on the labelled scans; print a table and write JSON."""
    from models.pipeline import segment_settings

    card = json.loads((args.packed / CARD_FILE).read_text())
    run = json.loads((args.snapshots / ADAPT_FILE).read_text())
    bundle, scans, labels_folder = _labelled(args.packed, card)
    net = _source_network(args.packed, card)
    method = run["method"]
    weights = {0: args.packed / WEIGHTS_FILE} | {
        int(p.stem.rsplit("-", 1)[1]): p for p in args.snapshots.glob(f"{method}-*.pt")
    }
    curve = {}
    for step, path in sorted(weights.items()):
        net.load_state_dict(_weights(path))
        curve[step] = common.scored(
            common.dice_per_scan(
                net,
                scans,
                labels_folder,
                bundle.card,
                segment_settings(bundle.card, card["largest_component"]),
            )
        )
        print(f"{method} step {step:4d}: mean Dice {curve[step]['mean_dice']:.3f}", flush=True)
    report = {
        **{k: run[k] for k in ("task", "bundle", "batch_size", "adapt_config", "device")},
        "labelled_scans": card["labelled_scans"],
        "largest_component": card["largest_component"],
        "adapted_on": run["machine"],
        "scored_on": common.machine(),
        "command": [run["command"], common.command("benchmarks.adaptation_offload")],
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
    common.write_json(args.out, report)
    print(f"\n{card['task']}: {card['bundle']}, batch of {run['batch_size']}, {method} on {run['device']}\n")
    print("| steps | mean Dice |\n|---|---|")
    for step, point in curve.items():
        print(f"| {step} | {point['mean_dice']:.3f} |")
    print(f"wrote {args.out}")


def score_sweep(args: argparse.Namespace) -> None:
    """Score the last snapshot of every run of a sweep, each seed alone and the seeds' mean probabilities
    (an ensemble), against the source model; print a table and write JSON."""
    from models.inference import predict_volume, torch_predictor
    from models.postprocessing import LargestComponent

    card = json.loads((args.packed / CARD_FILE).read_text())
    bundle, scans, labels_folder = _labelled(args.packed, card)
    net = _source_network(args.packed, card)
    clean_up = LargestComponent(card["largest_component"])

    def probabilities(weights: Path) -> list[np.ndarray]:
        net.load_state_dict(_weights(weights))
        predict = torch_predictor(net.eval())
        return [predict_volume(scan.array, predict, card["patch_size"]) for scan in scans]

    def scored_probabilities(probs: list[np.ndarray]) -> dict:
        return common.scored(
            {
                s.case: common.scan_dice(
                    p, s, labels_folder, labels=bundle.card.labels, largest_component=clean_up
                )
                for s, p in zip(scans, probs, strict=True)
            }
        )

    source = scored_probabilities(probabilities(args.packed / WEIGHTS_FILE))
    runs: dict[str, list[tuple[int, dict, Path]]] = {}
    for folder in sorted(p for p in args.sweep.iterdir() if (p / ADAPT_FILE).exists()):
        run = json.loads((folder / ADAPT_FILE).read_text())
        name = folder.name.rsplit("-seed", 1)[0]
        runs.setdefault(name, []).append((run["adapt_config"]["seed"], run, folder))
    settings = {}
    for name, seeds in runs.items():
        total, rows = None, {}
        for seed, run, folder in sorted(seeds, key=lambda r: r[0]):
            probs = probabilities(folder / f"{run['method']}-{run['steps']}.pt")
            total = probs if total is None else [t + p for t, p in zip(total, probs, strict=True)]
            rows[seed] = {
                **scored_probabilities(probs),
                **{k: run[k] for k in ("seconds", "seconds_per_step", "peak_gpu_memory_mib", "steps")},
            }
            print(f"{name} seed {seed}: mean Dice {rows[seed]['mean_dice']:.3f}", flush=True)
        ensemble = scored_probabilities([t / len(rows) for t in total])
        worst = min(r["scans"][c] - v for r in rows.values() for c, v in source["scans"].items())
        settings[name] = {
            "overrides": {k: v for k, v in seeds[0][1]["config_overrides"].items() if k != "seed"},
            "seeds": rows,
            "mean_over_seeds": round(float(np.mean([r["mean_dice"] for r in rows.values()])), 4),
            "ensemble_of_seeds": ensemble,
            "worst_scan_vs_none": round(worst, 4),
        }
    report = {
        "task": card["task"],
        "bundle": card["bundle"],
        "batch_size": len(card["cases"]),
        "labelled_scans": card["labelled_scans"],
        "largest_component": card["largest_component"],
        "adapted_on": next(iter(runs.values()))[0][1]["machine"] if runs else None,
        "scored_on": common.machine(),
        "command": common.command("benchmarks.adaptation_offload"),
        "adapt_commands": sorted({run["command"] for seeds in runs.values() for _, run, _ in seeds}),
        "none": source,
        "settings": settings,
    }
    common.write_json(args.out, report)
    seeds = sorted({seed for row in settings.values() for seed in row["seeds"]})
    print(
        f"\n{card['task']}: {card['bundle']}, batch of {len(card['cases'])}, none {source['mean_dice']:.3f}\n"
    )
    print(
        "| setting | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | ensemble of seeds | worst scan vs none"
        " | ms/step |\n|" + "---|" * (len(seeds) + 5)
    )
    for name, row in settings.items():
        cells = [f"{row['seeds'][s]['mean_dice']:.3f}" if s in row["seeds"] else "" for s in seeds]
        ms = np.mean([r["seconds_per_step"] for r in row["seeds"].values()]) * 1e3
        print(
            f"| {name} | {' | '.join(cells)} | {row['mean_over_seeds']:.3f} | "
            f"{row['ensemble_of_seeds']['mean_dice']:.3f} | {100 * row['worst_scan_vs_none']:+.1f} | {ms:.0f} |"
        )
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
        "command": common.command("benchmarks.adaptation_offload"),
        "rule": rule.model_dump(include={"collapse_ratio", "collapse_scans"}),
        "snapshots": rows,
    }
    print(f"wrote {common.write_json(args.out, report)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("pack", help="prepare a task's batch into a folder")
    common.add_task_arguments(p, limit=15)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(run=pack)
    a = sub.add_parser("adapt", help="adapt to a packed batch, keeping snapshots")
    a.add_argument("packed", type=Path)
    a.add_argument("--method", choices=common.STEP_METHODS, default=Method.MPL.value)
    a.add_argument("--checkpoints", nargs="+", type=int, required=True)
    a.add_argument("--config", default="{}", help="AdaptConfig overrides as JSON")
    a.add_argument("--device", default="cuda", help="cuda or cpu")
    a.add_argument("--snapshots", type=Path, required=True, help="folder for the snapshots and adapt.json")
    a.set_defaults(run=adapt_packed)
    w = sub.add_parser("sweep", help="adapt a packed batch once per setting and seed")
    w.add_argument("packed", type=Path)
    w.add_argument("--grid", nargs="+", required=True, help="NAME=JSON: AdaptConfig overrides per setting")
    w.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    w.add_argument("--method", choices=common.STEP_METHODS, default=Method.MPL.value)
    w.add_argument("--checkpoints", nargs="+", type=int, default=[100])
    w.add_argument("--device", default="cuda", help="cuda or cpu")
    w.add_argument("--half", action="store_true", help="store the snapshots in half precision (smaller)")
    w.add_argument("--snapshots", type=Path, required=True, help="folder for one sub-folder per run")
    w.set_defaults(run=sweep)
    s = sub.add_parser("score", help="score the snapshots of one adapt run")
    s.add_argument("packed", type=Path)
    s.add_argument("snapshots", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(run=score)
    v = sub.add_parser("score-sweep", help="score a sweep: each seed, their ensemble, against the source")
    v.add_argument("packed", type=Path)
    v.add_argument("sweep", type=Path)
    v.add_argument("--out", type=Path, required=True)
    v.set_defaults(run=score_sweep)
    c = sub.add_parser("collapse", help="the restart rule on every snapshot of some adapt runs (label-free)")
    c.add_argument("packed", type=Path)
    c.add_argument("snapshots", type=Path, nargs="+")
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(run=collapse)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
