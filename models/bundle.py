"""Checkpoint bundle: the one contract between the trainer, the workers and the service.

A bundle is a directory holding ``weights.pt`` (a state dict), ``model.onnx`` (the local predictor, opset >= 17)
and ``model_card.json``. Loading verifies the card's schema and both checksums. Reading cards and bundles needs no
torch: only loading, exporting and saving a network import it.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from models.checksums import sha256_file
from models.network_config import NetworkConfig
from models.postprocessing import LargestComponent
from models.preprocessing import Normalisation, Spacing

if TYPE_CHECKING:
    import torch

    from models.network import GlobalLocalUNet

CARD_FILE, WEIGHTS_FILE, ONNX_FILE = "model_card.json", "weights.pt", "model.onnx"
ONNX_OPSET = 18
REPO_BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


class BundleError(ValueError):
    """A bundle that is missing, unknown, corrupt or inconsistent with its card."""


class ModelCard(BaseModel):
    """What a checkpoint is, how to feed it, and how good it was on validation data."""

    schema_version: int = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = "1"
    description: str = ""
    labels: dict[int, str]
    modality: str = "MR"
    target_spacing: Spacing = Field(description="x, y, z in mm; 0 keeps each scan's own spacing on that axis")
    patch_size: tuple[int, int, int] = Field(description="z, y, x in voxels")
    normalisation: Normalisation = Normalisation()
    network: NetworkConfig = NetworkConfig()
    parameters: int = 0
    flops_per_patch: int = 0
    training: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    label_volumes_ml: dict[str, tuple[float, float]] = Field(
        default={}, description="smallest and largest volume of each structure in the source training labels"
    )
    largest_component: LargestComponent = Field(
        default=LargestComponent.off, description="connected-component clean-up of the predicted label maps"
    )
    test_time_flips: tuple[Literal[1, 2], ...] = Field(
        default=(),
        max_length=2,
        description="in-plane axes (1: y, 2: x) along which segmentation also predicts the mirrored scan and "
        "averages (a flip ensemble); empty: one prediction",
    )
    weights_sha256: str = ""
    onnx_sha256: str = ""
    onnx_opset: int = ONNX_OPSET
    created_at: str = ""
    parent: dict[str, Any] | None = None

    @field_validator("validation")
    @classmethod
    def _entropy_is_a_share(cls, validation: dict[str, Any]) -> dict[str, Any]:
        """The held-out foreground entropy, the reference of ``mpl``'s shift gate, must be a number in (0, 1]."""
        entropy = validation.get("foreground_entropy")
        is_number = isinstance(entropy, int | float) and not isinstance(entropy, bool)
        if entropy is not None and not (is_number and 0.0 < entropy <= 1.0):
            raise ValueError(f"foreground_entropy must be a number in (0, 1], got {entropy!r}")
        return validation

    def training_stages(self) -> list[dict[str, Any]]:
        """Every training stage behind these weights, oldest first and this card's own last: each stage's bundle,
        steps, peak learning rate, seconds, device, held-out Dice and Dice curve (``training.earlier_stages``
        holds the stages before this one)."""
        config = self.training.get("config", {})
        stage = {
            "bundle": f"{self.name}:{self.version}",
            "steps": config.get("steps"),
            "lr": config.get("lr"),
            "seconds": self.training.get("seconds"),
            "device": self.training.get("device"),
            "dice_mean": self.validation.get("dice_mean"),
            "curve": self.training.get("curve", []),
        }
        return [*self.training.get("earlier_stages", []), stage]


class Bundle:
    """A verified checkpoint bundle on disk."""

    def __init__(self, path: Path, card: ModelCard) -> None:
        self.path = path
        self.card = card

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def ref(self) -> str:
        """``name:version``, the name users and the service pass around."""
        return f"{self.card.name}:{self.card.version}"

    def load_network(self, device: str | torch.device = "cpu") -> GlobalLocalUNet:
        """The network with the bundle's weights, in eval mode."""
        import torch

        from models.network import GlobalLocalUNet

        net = GlobalLocalUNet(self.card.network)
        state = torch.load(self.path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        return net.to(device).eval()

    def __repr__(self) -> str:
        return f"Bundle({self.ref} at {self.path})"


def read_card(folder: Path) -> ModelCard:
    """The validated model card of a bundle folder, without verifying its files."""
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise BundleError(f"{folder}: not a bundle (no {CARD_FILE})")
    try:
        return ModelCard.model_validate_json(card_path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise BundleError(f"{card_path}: invalid model card: {first['msg']} at {first['loc']}") from exc


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify a bundle directory."""
    path = Path(path)
    card = read_card(path)
    for fname, expected in ((WEIGHTS_FILE, card.weights_sha256), (ONNX_FILE, card.onnx_sha256)):
        f = path / fname
        if not f.is_file():
            raise BundleError(f"{path}: missing {fname}")
        if sha256_file(f) != expected:
            raise BundleError(f"{f}: checksum does not match the model card (corrupt or modified file)")
    return Bundle(path, card)


def bundles_root(root: str | Path | None = None) -> Path:
    """Folder searched for bundles by name: ``root`` as the caller configured it, else the repository's ``bundles/``."""
    return Path(root) if root else REPO_BUNDLES


def bundle_folders(root: str | Path | None = None) -> list[Path]:
    """Every folder under the root that holds a model card, whether or not the bundle in it is valid."""
    base = bundles_root(root)
    return sorted(card.parent for card in base.glob(f"**/{CARD_FILE}")) if base.is_dir() else []


def list_bundles(root: str | Path | None = None) -> list[Bundle]:
    """All bundles under the root, verified, sorted by name and version.

    A broken bundle (invalid card, missing file, checksum mismatch) does not drop out of the list: the call raises
    :class:`BundleError` naming every broken one.
    """
    found, broken = [], []
    for folder in bundle_folders(root):
        try:
            found.append(load_bundle(folder))
        except BundleError as exc:
            broken.append(str(exc))
    if broken:
        raise BundleError(f"{len(broken)} broken bundle(s) under {bundles_root(root)}: " + "; ".join(broken))
    return sorted(found, key=lambda b: (b.card.name, b.card.version))


def resolve_bundle(spec: str | Path, root: str | Path | None = None) -> Bundle:
    """A verified bundle by path, or by ``name`` / ``name:version`` (newest version when none is given).

    Only the chosen bundle is verified: a corrupt one raises :class:`BundleError` naming the checksum failure, and
    other bundles' files do not matter. A card under the root that cannot be read raises too, since it may
    describe the model asked for.
    """
    if Path(spec).is_dir():
        return load_bundle(spec)
    name, _, version = str(spec).partition(":")
    cards = [(folder, read_card(folder)) for folder in bundle_folders(root)]
    matches = [(f, c) for f, c in cards if c.name == name and (not version or c.version == version)]
    if not matches:
        known = ", ".join(sorted({f"{c.name}:{c.version}" for _, c in cards})) or "none"
        raise BundleError(f"unknown model {spec!r}; available: {known}")
    folder, _ = max(matches, key=lambda m: _version_key(m[1].version))
    return load_bundle(folder)


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in version.replace("-", ".").split("."))


def export_onnx(net: GlobalLocalUNet, patch: tuple[int, int, int], path: Path) -> Path:
    """Export the local predictor (inputs: local patch, global view, box) to ONNX with a dynamic batch."""
    import torch

    from models.network import LocalPredictor

    was_training = net.training
    model = LocalPredictor(net).cpu().eval()
    x = torch.zeros(1, net.config.in_channels, *patch)
    box = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    torch.onnx.export(
        model,
        (x, x, box),
        str(path),
        input_names=["local", "global_view", "box"],
        output_names=["logits"],
        dynamic_axes={
            "local": {0: "batch"},
            "global_view": {0: "batch"},
            "box": {0: "batch"},
            "logits": {0: "batch"},
        },
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
    net.train(was_training)
    return path


def write_card(card: ModelCard, folder: Path) -> None:
    """Write a bundle's model card (the card is not checksummed: completing it keeps the bundle valid)."""
    (folder / CARD_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")


def save_bundle(net: GlobalLocalUNet, card: ModelCard, out_dir: str | Path) -> Bundle:
    """Write weights, ONNX export and the completed card atomically into ``out_dir``."""
    import torch

    from models.network import count_parameters, flops_per_patch

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    net = copy.deepcopy(net).cpu().eval()
    try:
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(state, tmp / WEIGHTS_FILE)
        export_onnx(net, card.patch_size, tmp / ONNX_FILE)
        card = card.model_copy(
            update={
                "network": net.config,
                "parameters": count_parameters(net),
                "flops_per_patch": flops_per_patch(net.cpu(), card.patch_size),
                "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
                "onnx_sha256": sha256_file(tmp / ONNX_FILE),
                "onnx_opset": ONNX_OPSET,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        write_card(card, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.chmod(0o755)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out_dir)
