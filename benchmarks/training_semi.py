"""Mixed-domain semi-supervised training (``ttaseg train --mode semi``) against the labelled scans alone.

Five labelled bSSFP scans; unlabelled ACDC, bSSFP and LGE scans pooled without domain labels. The labelled-only
model trains first (supervised, the shipped recipe) or is given (``--labelled-only``); ``semi`` starts from its
weights and adds the unlabelled pool. Both are scored per domain, on the model grid's prediction mapped back to
each scan's own grid, against the labels of scans that neither run trained on with labels: every ACDC scan, the
20 other bSSFP scans and the 5 LGE ``val`` scans (LGE labels are used for scoring only). Both runs checkpoint
into ``--work`` and resume after a kill. Prints a table per domain and writes JSON with the machine and the
seconds each run took.

    .venv/bin/python -m benchmarks.training_semi --steps 5000 --semi-steps 2000
    .venv/bin/python -m benchmarks.training_semi --labelled-only benchmarks/bundles/bssfp-few --semi-steps 200 \
        --semi-lr 5e-4  # semi alone, from the repository's labelled-only model (1500 steps of the recipe)
    .venv/bin/python -m benchmarks.training_semi --steps 2 --semi-steps 2 --pool-limit 1 --score-limit 1  # smoke
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import DATA, RESULTS, command, dice_per_scan, machine, scored, write_json
from models.postprocessing import LargestComponent
from trainer.config import PLANS, Plan

DOMAINS = {  # name: (images, labels)
    "ACDC": ("cardiac/acdc_cine/images", "cardiac/acdc_cine/labels"),
    "bSSFP": ("cardiac/mscmr_bssfp/images", "cardiac/mscmr_bssfp/labels"),
    "LGE": ("cardiac/mscmr_lge/images", "cardiac/mscmr_lge/labels"),
}
LABELLED_DOMAIN, LABELLED_SCANS = "bSSFP", 5


def _files(folder: str) -> list[Path]:
    from trainer.data import image_files

    return image_files(DATA / folder)


def _split(pool_limit: int | None, domains: list[str]) -> tuple[list[Path], dict[str, list[Path]]]:
    """The labelled bSSFP files, and the unlabelled files of each of ``domains`` (at most ``pool_limit``)."""
    labelled = _files(DOMAINS[LABELLED_DOMAIN][0])[:LABELLED_SCANS]
    pool = {d: [p for p in _files(DOMAINS[d][0]) if p not in labelled] for d in domains}
    return labelled, {d: files[:pool_limit] for d, files in pool.items()}


def _scored(labelled: list[Path], score_limit: int | None) -> dict[str, list[Path]]:
    """Per domain: the scans with labels that no run was given labels of."""
    from models.io import case_name

    out = {}
    for d, (images, labels) in DOMAINS.items():
        known = {case_name(p) for p in (DATA / labels).iterdir()}
        files = [p for p in _files(images) if case_name(p) in known and p not in labelled]
        out[d] = files[:score_limit]
    return out


def _score(bundle, files: dict[str, list[Path]]) -> dict[str, dict]:
    from models.pipeline import load_scans, segment_settings

    card = bundle.card
    settings = segment_settings(card, LargestComponent.foreground)
    net = bundle.load_network()
    result = {}
    for d, paths in files.items():
        scans = load_scans(paths, bundle, None)
        per_scan = dice_per_scan(net, scans, DATA / DOMAINS[d][1], card, settings)
        result[d] = scored(per_scan)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5000, help="steps of the labelled-only training")
    parser.add_argument(
        "--semi-steps", type=int, default=2000, help="steps of semi, from the labelled-only weights"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="unlabelled scans per semi step (labelled: the recipe's batch)",
    )
    parser.add_argument(
        "--semi-lr", type=float, default=None, help="peak learning rate of semi (default: the labelled run's)"
    )
    parser.add_argument(
        "--labelled-batch",
        type=int,
        default=None,
        help="labelled slices (or patches) per semi step (default: the labelled run's batch)",
    )
    parser.add_argument("--plan", choices=[p.value for p in Plan], default=Plan.SLICE.value)
    parser.add_argument(
        "--config",
        default=None,
        help="JSON object of further TrainConfig fields (with --labelled-only: of the semi step)",
    )
    parser.add_argument("--semi-config", default=None, help="JSON object of SemiConfig fields")
    parser.add_argument("--pool-limit", type=int, default=None, help="at most N unlabelled scans per domain")
    parser.add_argument(
        "--pool-domains",
        nargs="+",
        choices=list(DOMAINS),
        default=list(DOMAINS),
        help="domains whose scans form the unlabelled pool (every domain is scored)",
    )
    parser.add_argument(
        "--labelled-only",
        type=Path,
        default=None,
        help="a labelled-only bundle of the five labelled scans to start semi from, instead of training one "
        "(its card's recipe replaces --plan and --steps; --config then changes the semi step's)",
    )
    parser.add_argument("--score-limit", type=int, default=None, help="score at most N scans per domain")
    parser.add_argument("--work", type=Path, default=Path("runs/semi-benchmark"), help="checkpoints; resumes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_semi.json")
    parser.add_argument(
        "--report", type=Path, default=None, help="print the tables of a JSON this benchmark wrote, and stop"
    )
    args = parser.parse_args()
    if args.report:
        try:
            print_table(json.loads(args.report.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--report {args.report}: not a JSON this benchmark wrote ({exc!r})")
        return

    from models.bundle import BundleError, load_bundle
    from models.io import case_name
    from trainer.config import SemiConfig, TrainConfig
    from trainer.data import load_case
    from trainer.semi import train_semi
    from trainer.train import TrainRun, train_source

    labelled_files, pool_files = _split(args.pool_limit, args.pool_domains)
    try:
        given = load_bundle(args.labelled_only) if args.labelled_only else None
    except BundleError as exc:
        parser.error(str(exc))
    wanted = [case_name(p) for p in labelled_files]
    if given and given.card.training.get("train_cases") != wanted:
        parser.error(f"{args.labelled_only} was not trained on the labelled scans {wanted}")
    cfg = TrainConfig.model_validate(
        given.card.training["config"]
        if given
        else {
            **PLANS[Plan(args.plan)],
            "steps": args.steps,
            "val_every": max(1, min(250, args.steps)),
            **(json.loads(args.config) if args.config else {}),
        }
    )
    semi_settings = SemiConfig.model_validate(
        {
            "unlabelled_batch_size": args.batch_size,
            **(json.loads(args.semi_config) if args.semi_config else {}),
        }
    )
    names = {int(k): v for k, v in json.loads((DATA / "cardiac/labels.json").read_text()).items()}
    grid = {"spacing": cfg.target_spacing, "normalisation": cfg.normalisation}
    labels_dir = DATA / DOMAINS[LABELLED_DOMAIN][1]
    labelled = [load_case(p, labels_dir / p.name, **grid, n_classes=len(names)) for p in labelled_files]
    pool = [load_case(p, None, **grid) for files in pool_files.values() for p in files]
    heart = {"device": args.device, "largest_component": LargestComponent.foreground}
    alone = given or train_source(
        labelled,
        [],
        names,
        TrainRun(args.work / "alone", args.work / "alone-bundle", "bssfp-few", **heart),
        cfg,
        progress=lambda step, status: print(f"labelled only: step {step} {status}", flush=True),
    )
    semi_cfg = cfg.model_copy(
        update={
            "steps": args.semi_steps,
            "val_every": max(1, min(50, args.semi_steps)),
            **({"lr": args.semi_lr} if args.semi_lr is not None else {}),
            **({"batch_size": args.labelled_batch} if args.labelled_batch is not None else {}),
            **(json.loads(args.config) if args.config and given else {}),
        }
    )
    semi = train_semi(
        labelled,
        pool,
        [],
        names,
        TrainRun(
            args.work / "semi",
            args.work / "semi-bundle",
            "bssfp-few-semi",
            init_weights=alone.path / "weights.pt",
            **heart,
        ),
        semi_cfg,
        semi_settings,
        progress=lambda step, status: print(f"semi: step {step} {status}", flush=True),
    )
    score_files = _scored(labelled_files, args.score_limit)
    runs = {"labelled only": alone, "semi": semi}
    report = {
        "labelled": [p.name for p in labelled_files],
        "unlabelled": {d: [p.name for p in files] for d, files in pool_files.items()},
        "config": cfg.model_dump(mode="json"),
        "semi_config": semi_settings.model_dump(mode="json"),
        "machine": machine(),
        "command": command("benchmarks.training_semi"),
        "runs": {
            name: {
                "steps": b.card.training["config"]["steps"],
                "lr": b.card.training["config"]["lr"],
                "batch_size": b.card.training["config"]["batch_size"],
                "seconds": b.card.training["seconds"],
                "device": b.card.training["device"],
                "dice": _score(b, score_files),
            }
            for name, b in runs.items()
        },
    }
    print_table(report)
    print(f"wrote {write_json(args.out, report)}")


def print_table(report: dict) -> None:
    """Markdown table: mean Dice per domain of each run, their mean over domains, and each run's seconds; then,
    per domain, how many scans each later run segments better and worse than the first (labelled only)."""
    runs = report["runs"]
    print(
        "\n| run | steps | seconds | " + " | ".join(f"Dice {d}" for d in DOMAINS) + " | mean over domains |"
    )
    print("|" + "---|" * (4 + len(DOMAINS)))
    for name, run in runs.items():
        dice = [run["dice"][d]["mean_dice"] for d in DOMAINS]
        cells = [name, str(run["steps"]), f"{run['seconds']:.0f}", *(f"{v:.3f}" for v in dice)]
        print("| " + " | ".join(cells) + f" | **{np.mean(dice):.3f}** |")
    (first, base), *later = runs.items()
    print("\n| run | " + " | ".join(f"{d}: better / worse than {first}" for d in DOMAINS) + " |")
    print("|" + "---|" * (1 + len(DOMAINS)))
    for name, run in later:
        cells = []
        for d in DOMAINS:
            before, after = base["dice"][d]["scans"], run["dice"][d]["scans"]
            change = np.array([after[k] - before[k] for k in before])
            cells.append(f"{(change > 0).sum()} / {(change < 0).sum()} of {len(change)}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
