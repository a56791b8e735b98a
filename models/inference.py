"""Sliding-window segmentation (MONAI) with global context, through ONNX Runtime or PyTorch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from models.network import GlobalLocalUNet
from models.sampling import box_of, global_view, mirror_views, pad_to_patch

Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
OVERLAP = 0.25
SLICES_PER_CALL = 8  # windows per network call for slice-wise plans (patch one slice thick)


def onnx_session(path: str | Path, device: str = "cpu"):
    """An ONNX Runtime session on CUDA when asked for and available, else on the CPU."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def onnx_predictor(session) -> Predictor:
    """Wrap an ONNX Runtime session as a (local, global_view, box) -> logits callable."""

    def predict(local: torch.Tensor, gview: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        feeds = {
            "local": local.cpu().numpy().astype(np.float32),
            "global_view": gview.cpu().numpy().astype(np.float32),
            "box": box.cpu().numpy().astype(np.float32),
        }
        return torch.from_numpy(session.run(["logits"], feeds)[0])

    return predict


def torch_predictor(net: GlobalLocalUNet) -> Predictor:
    """Wrap an eager network as a (local, global_view, box) -> logits callable."""
    device = next(net.parameters()).device

    @torch.no_grad()
    def predict(local: torch.Tensor, gview: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        return net(local.to(device), gview.to(device), box.to(device)).local_logits.float().cpu()

    return predict


def flip_ensemble(predict: Predictor, flips: Sequence[int]) -> Predictor:
    """``predict`` averaged with its logits of the views mirrored along each of ``flips`` (1: y, 2: x), mirrored
    back: a flip ensemble of a network trained with flips, at the cost of one more call per axis."""
    if not flips:
        return predict

    def ensemble(local: torch.Tensor, gview: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        logits = predict(local, gview, box)
        for axis in flips:
            logits = logits + predict(*mirror_views(local, gview, box, axis)).flip(axis + 2)
        return logits / (1 + len(flips))

    return ensemble


def predict_volume(
    array: np.ndarray, predict: Predictor, patch: Sequence[int], overlap: float = OVERLAP
) -> np.ndarray:
    """Class probabilities (C, z, y, x) for a normalised volume on the model grid."""
    padded, crop = pad_to_patch(array, patch)
    volume = torch.from_numpy(np.ascontiguousarray(padded))[None, None]
    shape = padded.shape
    slice_wise = patch[0] == 1
    whole = None if slice_wise else global_view(volume, patch)

    def window(local: torch.Tensor, slices: Sequence[Sequence[slice]]) -> torch.Tensor:
        starts = [[s.start for s in sl[-3:]] for sl in slices]
        boxes = torch.stack([box_of(st, patch, shape) for st in starts])
        if slice_wise:
            gviews = torch.cat([global_view(volume, patch, st[0]) for st in starts])
        else:
            gviews = whole.expand(local.shape[0], -1, -1, -1, -1)
        return predict(local, gviews, boxes)

    with torch.no_grad():
        logits = sliding_window_inference(
            volume,
            tuple(patch),
            SLICES_PER_CALL if slice_wise else 1,
            window,
            overlap=overlap,
            mode="gaussian",
            with_coord=True,
        )
    probs = torch.softmax(logits, dim=1)[0].numpy()
    return probs[(slice(None), *crop)]
