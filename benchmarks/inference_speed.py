"""ONNX Runtime vs eager PyTorch on the same sliding windows of a real scan, in one run (ratio, not absolutes).

.venv/bin/python -m benchmarks.inference_speed --model cardiac-bssfp --repeats 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import DATA, RESULTS, machine, write_json
from models.bundle import resolve_bundle
from models.inference import onnx_predictor, onnx_session, predict_volume, torch_predictor
from models.io import read_image
from models.preprocessing import prepare


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="cardiac-bssfp")
    parser.add_argument("--scan", type=Path, default=DATA / "cardiac/mscmr_lge/images/subject1_lge.nii.gz")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "inference_speed.json")
    args = parser.parse_args()

    bundle = resolve_bundle(args.model)
    card = bundle.card
    scan = prepare(read_image(args.scan), "scan", card.target_spacing, card.normalisation)
    net = bundle.load_network(args.device)
    engines = {
        "pytorch-eager": torch_predictor(net),
        "onnxruntime": onnx_predictor(onnx_session(bundle.onnx_path, args.device)),
    }
    timings: dict[str, list[float]] = {name: [] for name in engines}
    outputs = {}
    for _ in range(args.repeats):  # interleaved so both see the same machine load
        for name, predict in engines.items():
            start = time.perf_counter()
            outputs[name] = predict_volume(scan.array, predict, card.patch_size)
            timings[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in timings.items()}
    report = {
        "model": bundle.ref,
        "scan": args.scan.name,
        "model_grid": list(scan.array.shape),
        "seconds_best_of": best,
        "speedup_onnx_vs_eager": round(best["pytorch-eager"] / best["onnxruntime"], 2),
        "max_abs_probability_difference": float(abs(outputs["onnxruntime"] - outputs["pytorch-eager"]).max()),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
    }
    print(f"| engine | best of {args.repeats} (s) |\n|---|---|")
    for name, sec in best.items():
        print(f"| {name} | {sec:.2f} |")
    print(
        f"ONNX Runtime speed-up: x{report['speedup_onnx_vs_eager']}, "
        f"max |p_onnx - p_torch| = {report['max_abs_probability_difference']:.2e}"
    )
    write_json(args.out, report)


if __name__ == "__main__":
    main()
