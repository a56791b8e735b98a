"""``ttaseg``: train source models, adapt them to a batch of target scans at test time, segment, evaluate."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.progress import ProgressReport
from models.postprocessing import LargestComponent
from models.terms import Method, Phase, TrainMode
from trainer.config import PLANS, PRETRAIN_STEPS, FederatedConfig, Plan, SemiConfig, TrainConfig, UdaConfig

if TYPE_CHECKING:
    from models.bundle import ModelCard
    from trainer.data import TrainingCase
    from trainer.train import TrainRun

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console(stderr=True)
TRAIN = TrainConfig()  # the shipped training settings: the defaults of `train` and `pretrain`
PlanOption = Annotated[
    Plan,
    typer.Option(
        help="network plan: 2d, slice-wise on each scan's own slices (the shipped recipe); 3d, the anisotropic "
        "3D U-Net on 8 mm slices"
    ),
]
UDA, FEDERATED = UdaConfig(), FederatedConfig()
SettingsT = TypeVar("SettingsT", bound=BaseModel)

Bundles = Annotated[
    Path | None,
    typer.Option(
        "--bundles",
        envvar="TTASEG_BUNDLES",
        help="folder of bundles that --model NAME resolves; default: the repository's bundles/",
    ),
]


def _fail(exc: Exception) -> typer.Exit:
    """Print the reason and give the exit code of bad input (2)."""
    console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _labels_file(path: Path) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


@app.command()
def segment(
    inputs: Annotated[
        list[Path], typer.Argument(help="NIfTI/NRRD/MHA files or DICOM series folders: one batch")
    ],
    model: Annotated[str, typer.Option(help="bundle name[:version] or bundle folder")] = "cardiac-bssfp",
    adapt: Annotated[Method, typer.Option(help="test-time adaptation method")] = Method.MPL,
    steps: Annotated[int | None, typer.Option(help="adaptation steps (default: the method's)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    out: Annotated[Path, typer.Option(help="output folder: <case>.nii.gz and <case>.json")] = Path("out"),
    save_adapted: Annotated[
        Path | None, typer.Option(help="also save the adapted model as a bundle here")
    ] = None,
    uncertainty: Annotated[bool, typer.Option(help="also write <case>_uncertainty.nii.gz")] = False,
    largest_component: Annotated[
        LargestComponent | None,
        typer.Option(
            help="keep the largest connected object of all structures together (foreground) or of each "
            "structure; default: the model card's"
        ),
    ] = None,
    bundles: Bundles = None,
) -> None:
    """Adapt the model to all INPUTS together (without labels), then segment each onto its own grid.

    Progress is a live bar in a terminal and plain lines (every 10%) in a log file."""
    from models.bundle import BundleError, resolve_bundle
    from models.io import InputError
    from models.pipeline import segment_batch

    try:
        bundle = resolve_bundle(model, bundles)
        with ProgressReport(console, {Phase.ADAPTING: 100, Phase.SEGMENTING: 100}) as report:
            results = segment_batch(
                inputs,
                bundle,
                out_dir=out,
                method=adapt.value,
                steps=steps,
                device=device,
                progress=report.update,
                save_adapted=save_adapted,
                uncertainty=uncertainty,
                largest_component=largest_component,
            )
    except (InputError, BundleError, ValueError) as exc:
        raise _fail(exc) from exc
    table = Table(
        "case",
        "fallback",
        "seconds",
        *next(iter(results)).volumes_ml.keys(),
        title=f"{bundle.ref} / {adapt.value}",
    )
    for r in results:
        table.add_row(
            r.case,
            r.fallback_reason or "no",
            f"{r.seconds:.1f}",
            *(f"{v:.1f} mL" for v in r.volumes_ml.values()),
        )
    Console().print(table)


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option(help="folder of predicted label maps")],
    labels: Annotated[Path, typer.Option(help="folder of reference label maps, matched by case name")],
    label_names: Annotated[Path | None, typer.Option(help="labels.json; default: the model card's")] = None,
    model: Annotated[str, typer.Option(help="bundle whose label names to use")] = "cardiac-bssfp",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the metrics as JSON here")] = None,
    bundles: Bundles = None,
) -> None:
    """Dice, HD95 and ASSD (MONAI metrics) and predicted over reference volume per structure, and their means."""
    from models.bundle import BundleError, resolve_bundle
    from models.evaluation import evaluate_folders

    try:
        names = _labels_file(label_names) if label_names else resolve_bundle(model, bundles).card.labels
    except BundleError as exc:
        raise _fail(exc) from exc
    result = evaluate_folders(pred, labels, names)
    table = Table("case", *(n for k, n in sorted(names.items()) if k), "mean Dice", title="Dice")
    for case, m in result["cases"].items():
        dices = [m[s]["dice"] for s in m]
        table.add_row(case, *(f"{d:.3f}" for d in dices), f"{sum(dices) / len(dices):.3f}")
    Console().print(table)
    summary = Table(
        "structure", "Dice", "HD95 (mm)", "ASSD (mm)", "volume / reference", title="mean over cases"
    )
    for s, m in result["mean"].items():
        summary.add_row(
            s, f"{m['dice']:.3f}", f"{m['hd95']:.2f}", f"{m['assd']:.2f}", f"{m['volume_ratio']:.3f}"
        )
    Console().print(summary)
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


def _settings(model: type[SettingsT], options: dict, overrides: str | None, option: str) -> SettingsT:
    """Settings from the command's options and a JSON object of further fields; a bad field exits 2."""
    try:
        return model.model_validate({**options, **(json.loads(overrides) if overrides else {})})
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(f"{option}: {exc}") from exc


@app.command()
def prepare(
    images: Annotated[Path, typer.Option(help="folder of images, or a CSV with image,label columns")],
    out: Annotated[Path, typer.Option(help=".npz file to write")],
    labels: Annotated[Path | None, typer.Option(help="folder of label maps named like the images")] = None,
    label_names: Annotated[
        Path | None, typer.Option(help="labels.json; without it the scans are prepared unlabelled")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="the JSON object `train --config` will take; its target_spacing and normalisation count"
        ),
    ] = None,
    plan: PlanOption = Plan.SLICE,
) -> None:
    """Resample and normalise scans for training once, on the grid of `train --plan` (and `--config`), into one
    file that `train --images` reads anywhere."""
    from trainer.data import load_cases, save_prepared

    names = _labels_file(label_names) if label_names else None
    grid = _settings(TrainConfig, PLANS[plan], config, "--config")
    cases = load_cases(images, labels, names, grid.target_spacing, grid.normalisation)
    console.print(
        f"wrote {save_prepared(cases, out, grid.target_spacing, grid.normalisation)} ({len(cases)} scans)"
    )


@app.command()
def train(
    images: Annotated[
        Path,
        typer.Option(help="folder of source images, a CSV with image,label columns, or a prepared .npz"),
    ],
    labels: Annotated[Path | None, typer.Option(help="folder of label maps named like the images")] = None,
    label_names: Annotated[Path, typer.Option(help="labels.json mapping label values to names")] = Path(
        "labels.json"
    ),
    name: Annotated[str, typer.Option(help="bundle name")] = "source",
    version: Annotated[str, typer.Option(help="bundle version")] = "1",
    out: Annotated[Path, typer.Option(help="bundle folder to write")] = Path("bundles/source"),
    work: Annotated[Path, typer.Option(help="checkpoints and history; training resumes from here")] = Path(
        "runs/train"
    ),
    steps: Annotated[int, typer.Option(help="training steps")] = TRAIN.steps,
    batch_size: Annotated[
        int | None, typer.Option(help="scans (2d: slices) per step; default: the plan's", show_default=False)
    ] = None,
    lr: Annotated[float, typer.Option(help="peak learning rate of the one-cycle schedule")] = TRAIN.lr,
    plan: PlanOption = Plan.SLICE,
    val_cases: Annotated[
        int,
        typer.Option(
            help="last N cases (by name) held out for validation; 0: none, the bundle keeps the last weights"
        ),
    ] = 5,
    val_every: Annotated[int, typer.Option(help="steps between validations")] = TRAIN.val_every,
    pretrained: Annotated[
        Path | None,
        typer.Option(
            help="initial weights: MAE weights from `ttaseg pretrain` or a source bundle's weights.pt"
        ),
    ] = None,
    random_convolution: Annotated[
        float, typer.Option(help="probability of random-convolution intensity augmentation per sample")
    ] = TRAIN.random_convolution_prob,
    histogram_shift: Annotated[
        float, typer.Option(help="probability of a random monotonic intensity curve per sample")
    ] = TRAIN.histogram_shift_prob,
    largest_component: Annotated[
        LargestComponent,
        typer.Option(
            help="the card's label-map clean-up: foreground when the structures form one object (a heart)"
        ),
    ] = LargestComponent.off,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    workers: Annotated[
        int, typer.Option(help="processes preparing augmented batches (0: none)")
    ] = TRAIN.workers,
    seed: Annotated[int, typer.Option()] = TRAIN.seed,
    config: Annotated[
        str | None,
        typer.Option(
            help="JSON object of further training settings (trainer.config.TrainConfig fields, e.g. the "
            "network plan and patch size); they override the options above"
        ),
    ] = None,
    mode: Annotated[
        TrainMode,
        typer.Option(
            help="source: labelled scans only; uda: + unlabelled --target-images trained together; "
            "federated: the source and every --target-images as sites in separate processes, sharing weights; "
            "semi: + --unlabelled scans of any domains, mixed (UST-RUN)"
        ),
    ] = TrainMode.SOURCE,
    target_images: Annotated[
        list[Path] | None,
        typer.Option(help="unlabelled target scans (folder or .npz; uda: one, federated: one per site)"),
    ] = None,
    unlabelled: Annotated[
        list[Path] | None,
        typer.Option(help="semi: unlabelled scans of any domains (folder or .npz; repeatable)"),
    ] = None,
    semi_config: Annotated[
        str | None,
        typer.Option(
            help="semi: JSON object of trainer.config.SemiConfig fields (unlabelled weight and batch, ramp, "
            "pseudo-label settings)"
        ),
    ] = None,
    pretrain_steps: Annotated[
        int, typer.Option(help="uda: masked-autoencoder steps on source + target (0 with --pretrained)")
    ] = UDA.pretrain_steps,
    warmup_steps: Annotated[
        int, typer.Option(help="uda: supervised steps before the target's pseudo-labels count")
    ] = UDA.warmup_steps,
    mae_rounds: Annotated[
        int, typer.Option(help="federated: masked-autoencoder rounds")
    ] = FEDERATED.mae_rounds,
    rounds: Annotated[int, typer.Option(help="federated: segmentation rounds")] = FEDERATED.rounds,
    warmup_rounds: Annotated[
        int, typer.Option(help="federated: segmentation rounds before the target sites join")
    ] = FEDERATED.warmup_rounds,
    local_steps: Annotated[
        int, typer.Option(help="federated: steps per site per round")
    ] = FEDERATED.local_steps,
) -> None:
    """Train a bundle: supervised on source scans (--mode source), or with unlabelled target scans trained
    together (uda) or kept at their sites (federated), or with unlabelled scans of several domains (semi).
    Labels of unlabelled or target scans are never read.

    Resumes from --work. Progress with the time left is a live bar in a terminal, plain lines in a log file."""
    from models.bundle import BundleError
    from trainer.data import load_cases
    from trainer.train import TrainRun, train_source

    options = {
        **PLANS[plan],
        "steps": steps,
        **({"batch_size": batch_size} if batch_size else {}),
        "lr": lr,
        "val_every": val_every,
        "seed": seed,
        "random_convolution_prob": random_convolution,
        "histogram_shift_prob": histogram_shift,
        "workers": workers,
    }
    cfg = _settings(TrainConfig, options, config, "--config")
    names = _labels_file(label_names)
    if mode in (TrainMode.UDA, TrainMode.FEDERATED) and not target_images:
        raise _fail(ValueError(f"--mode {mode} needs --target-images"))
    if (mode is TrainMode.SEMI) != bool(unlabelled):
        raise _fail(ValueError("--unlabelled goes with --mode semi, and --mode semi needs it"))
    if semi_config and mode is not TrainMode.SEMI:
        raise _fail(ValueError("--semi-config goes with --mode semi"))
    semi = _settings(SemiConfig, {}, semi_config, "--semi-config")
    try:
        run = TrainRun(
            work_dir=work,
            out_bundle=out,
            name=name,
            version=version,
            init_weights=pretrained,
            device=device,
            largest_component=largest_component,
            summary={"images": str(images), "labels": str(labels) if labels else None},
        )
    except BundleError as exc:  # a broken card beside --pretrained
        raise _fail(exc) from exc
    if mode is TrainMode.FEDERATED:
        fed = FederatedConfig(
            mae_rounds=mae_rounds, rounds=rounds, warmup_rounds=warmup_rounds, local_steps=local_steps
        )
        return _train_federated(images, labels, names, target_images, run, cfg, fed)
    cases = load_cases(images, labels, names, cfg.target_spacing, cfg.normalisation)
    train_cases, held = (cases[:-val_cases], cases[-val_cases:]) if val_cases else (cases, [])
    if mode is TrainMode.UDA:
        from trainer.uda import PRETRAINING, TRAINING, train_uda

        if len(target_images) != 1:
            raise _fail(ValueError("--mode uda takes one --target-images folder or .npz"))
        target = load_cases(target_images[0], None, None, cfg.target_spacing, cfg.normalisation)
        uda = UdaConfig(pretrain_steps=0 if pretrained else pretrain_steps, warmup_steps=warmup_steps)
        totals = {PRETRAINING: uda.pretrain_steps, TRAINING: cfg.steps} if uda.pretrain_steps else {}
        run = replace(run, summary={**run.summary, "target_images": str(target_images[0])})
        with ProgressReport(console, totals or {TRAINING: cfg.steps}, unit="steps") as report:
            bundle = train_uda(train_cases, target, held, names, run, cfg, uda, progress=report.update)
        console.print(f"wrote {bundle} ({bundle.card.training['weights']})")
        return
    with ProgressReport(console, {"training": cfg.steps}, unit="steps") as report:
        progress = partial(report.update, "training")
        if mode is TrainMode.SEMI:
            from trainer.semi import train_semi

            grid = (cfg.target_spacing, cfg.normalisation)
            pool = [c for d in unlabelled for c in load_cases(d, None, None, *grid)]
            run = replace(run, summary={**run.summary, "unlabelled": [str(d) for d in unlabelled]})
            bundle = train_semi(train_cases, pool, held, names, run, cfg, semi, progress=progress)
        else:
            bundle = train_source(train_cases, held, names, run, cfg, progress=progress)
    validation = bundle.card.validation
    if "dice_mean" in validation:
        console.print(
            f"wrote {bundle} validation Dice {validation['dice_mean']:.3f} (step {validation['step']})"
        )
    else:
        console.print(f"wrote {bundle} without validation: {bundle.card.training['weights']} weights")


def _train_federated(
    images: Path,
    labels: Path | None,
    names: dict[int, str],
    target_images: list[Path],
    run: TrainRun,
    cfg: TrainConfig,
    fed: FederatedConfig,
) -> None:
    """The source and each target folder as a site in its own process; progress by rounds."""
    from trainer.federated import Site, train_federated

    sites = [Site(name="source", images=str(images), labels=str(labels) if labels else None, labelled=True)]
    sites += [Site(name=f"target{i + 1}", images=str(t)) for i, t in enumerate(target_images)]
    with ProgressReport(console, {"rounds": fed.mae_rounds + fed.rounds}, unit="rounds") as report:
        bundle = train_federated(sites, names, run, cfg, fed, progress=partial(report.update, "rounds"))
    per_round = bundle.card.training["bytes_per_round"]["mean"]
    console.print(
        f"wrote {bundle} ({bundle.card.training['rounds']} rounds, {per_round / 1e6:.1f} MB per round)"
    )


@app.command()
def pretrain(
    folders: Annotated[
        list[Path],
        typer.Argument(help="folders of unlabelled scans or prepared .npz files (any domain allowed)"),
    ],
    work: Annotated[Path, typer.Option(help="checkpoints and mae.pt; pretraining resumes from here")] = Path(
        "runs/mae"
    ),
    steps: Annotated[int, typer.Option(help="pretraining steps")] = PRETRAIN_STEPS,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    workers: Annotated[
        int, typer.Option(help="processes preparing augmented batches (0: none)")
    ] = TRAIN.workers,
    seed: Annotated[int, typer.Option()] = TRAIN.seed,
    plan: PlanOption = Plan.SLICE,
) -> None:
    """Masked-autoencoder pretraining (masked blocks of the local patch and the global view) of the network of
    ``train --plan``; resumable."""
    from trainer.data import load_cases
    from trainer.train import pretrain_mae

    cfg = TrainConfig.model_validate({**PLANS[plan], "steps": steps, "seed": seed, "workers": workers})
    cases = [c for d in folders for c in load_cases(d, None, None, cfg.target_spacing, cfg.normalisation)]
    with ProgressReport(console, {"pretraining": cfg.steps}, unit="steps") as report:
        weights = pretrain_mae(
            cases,
            work,
            cfg=cfg,
            device=device,
            progress=lambda step, status: report.update("pretraining", step, status),
        )
    console.print(f"wrote {weights}")


@app.command()
def export(
    weights: Annotated[Path, typer.Argument(help="state dict (.pt) from training")],
    card: Annotated[Path, typer.Option(help="model card JSON to complete")],
    out: Annotated[Path, typer.Option(help="bundle folder to write")],
) -> None:
    """Package weights + model card as a bundle (weights, ONNX export, checksums)."""
    import torch

    from models.bundle import ModelCard, save_bundle
    from models.network import GlobalLocalUNet

    model_card = ModelCard.model_validate_json(card.read_text())
    net = GlobalLocalUNet(model_card.network)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("net", state))
    console.print(f"wrote {save_bundle(net, model_card, out)}")


CardToComplete = Annotated[Path, typer.Argument(help="bundle folder whose model card to complete")]
SourceScans = Annotated[Path, typer.Option(help="the source scans: prepared .npz, folder or CSV")]
SourceLabels = Annotated[Path | None, typer.Option(help="folder of label maps named like the images")]


@app.command("record-volumes")
def record_volumes(bundle: CardToComplete, images: SourceScans, labels: SourceLabels = None) -> None:
    """Record in the card each structure's volume range over its training cases (the guard's anatomy prior)."""
    from models.bundle import load_bundle, write_card
    from trainer.data import source_volume_ranges

    found = load_bundle(bundle)
    cases = _card_cases(found.card, "train_cases", images, labels)
    ranges = source_volume_ranges(cases, found.card.labels)
    write_card(found.card.model_copy(update={"label_volumes_ml": ranges}), found.path)
    for name, (lo, hi) in ranges.items():
        console.print(f"{name}: {lo:.1f} - {hi:.1f} mL")


@app.command("record-entropy")
def record_entropy(bundle: CardToComplete, images: SourceScans, labels: SourceLabels = None) -> None:
    """Record in the card the network's mean foreground entropy on its held-out source cases, the reference of
    test-time `mpl`'s shift gate (training records it itself; this completes an older card)."""
    from models.bundle import load_bundle, write_card
    from trainer.train import validate

    found = load_bundle(bundle)
    card = found.card
    entry = validate(
        found.load_network(),
        _card_cases(card, "val_cases", images, labels),
        card.patch_size,
        len(card.labels),
    )
    validation = {**card.validation, "foreground_entropy": entry["foreground_entropy"]}
    write_card(card.model_copy(update={"validation": validation}), found.path)
    console.print(
        f"held-out Dice {entry['dice_mean']:.4f} (card {card.validation.get('dice_mean', float('nan')):.4f}), "
        f"foreground entropy {entry['foreground_entropy']:.4f}"
    )


def _card_cases(card: ModelCard, key: str, images: Path, labels: Path | None) -> list[TrainingCase]:
    """The labelled cases of ``images`` that the card's ``training[key]`` names, on the card's grid; every one of
    them must be there."""
    from trainer.data import load_cases

    wanted = set(card.training.get(key, []))
    cases = [
        c
        for c in load_cases(images, labels, card.labels, card.target_spacing, card.normalisation)
        if c.case in wanted
    ]
    if not wanted or len(cases) != len(wanted):
        what = {"train_cases": "training cases", "val_cases": "held-out cases"}[key]
        raise typer.BadParameter(f"{images} holds {len(cases)} of the card's {len(wanted)} {what}")
    return cases


@app.command("flips")
def set_flips(
    bundle: Annotated[Path, typer.Argument(help="bundle folder whose model card to change")],
    axes: Annotated[
        list[int] | None, typer.Argument(help="in-plane axes (1: y, 2: x); none: one prediction")
    ] = None,
    version: Annotated[
        str, typer.Option(help="the card's new version: the bundle now segments differently")
    ] = "",
) -> None:
    """Set the flip ensemble with which the bundle's source model segments, as a new version of its card."""
    from pydantic import ValidationError

    from models.bundle import BundleError, ModelCard, load_bundle, write_card

    try:
        found = load_bundle(bundle)
        card = ModelCard.model_validate(
            {
                **found.card.model_dump(),
                "test_time_flips": axes or [],
                "version": version or found.card.version,
            }
        )
    except (BundleError, ValidationError) as exc:
        raise _fail(exc) from exc
    write_card(card, found.path)
    console.print(f"{card.name}:{card.version} segments with flips {list(card.test_time_flips) or 'none'}")


@app.command("models")
def list_models(bundles: Bundles = None) -> None:
    """List the bundles that `--model NAME` resolves; a broken bundle is an error that names it."""
    from models.bundle import BundleError, list_bundles

    try:
        found = list_bundles(bundles)
    except BundleError as exc:
        raise _fail(exc) from exc
    table = Table("model", "modality", "labels", "validation Dice", "path")
    for b in found:
        table.add_row(
            b.ref,
            b.card.modality,
            ", ".join(b.card.labels.values()),
            f"{b.card.validation.get('dice_mean', float('nan')):.3f}",
            str(b.path),
        )
    Console().print(table)
