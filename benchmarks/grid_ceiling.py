"""The Dice a perfect model could reach through each model grid: every labelled scan's reference labels are
resampled onto the grid (nearest neighbour), mapped back to the scan's own grid the way segmentations are
(linear per class, argmax) and scored against themselves. What is lost is lost to the grid alone: slices
interpolated between a scan's own, and in-plane detail below the grid's spacing.

Grids side by side: the shipped plans' 1.8 x 1.8 x 8 mm, and in-plane only (the scan's own slices kept, target
spacing 0 on the slice axis). Prints a table per domain and writes JSON with the machine.

    .venv/bin/python -m benchmarks.grid_ceiling
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import DATA, RESULTS, command, machine, write_json

DOMAINS = {  # name: folder with images/ and labels/
    "ACDC": "cardiac/acdc_cine",
    "bSSFP": "cardiac/mscmr_bssfp",
    "LGE": "cardiac/mscmr_lge",
}
GRIDS = {"1.8 x 1.8 x 8 mm": (1.8, 1.8, 8.0), "1.8 x 1.8 mm, own slices": (1.8, 1.8, 0.0)}


def round_trip_dice(image_path: Path, label_path: Path, spacing: tuple[float, float, float]) -> float:
    """Mean Dice over structures of a scan's labels after a round trip through the model grid."""
    import SimpleITK as sitk

    from models.guard import dice_agreement
    from models.io import read_image
    from models.preprocessing import (
        Normalisation,
        label_image,
        labels_to_model_grid,
        prepare,
        probabilities_to_original,
    )

    image = read_image(image_path)
    labels = sitk.ReadImage(str(label_path))
    labels.CopyInformation(image)
    scan = prepare(image, image_path.name, spacing, Normalisation())
    on_grid = labels_to_model_grid(labels, scan)
    ref = sitk.GetArrayFromImage(labels)
    n_classes = int(ref.max()) + 1
    one_hot = np.stack([(on_grid == k).astype(np.float32) for k in range(n_classes)])
    back = sitk.GetArrayFromImage(label_image(probabilities_to_original(one_hot, scan).argmax(0), image))
    return round(dice_agreement(back, ref, n_classes), 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "grid_ceiling.json")
    args = parser.parse_args()
    report = {"machine": machine(), "command": command("benchmarks.grid_ceiling"), "domains": {}}
    print("| domain | scans | " + " | ".join(GRIDS) + " |")
    print("|---|---|" + "---|" * len(GRIDS))
    for domain, folder in DOMAINS.items():
        labels = sorted((DATA / folder / "labels").iterdir())
        row = {}
        for grid, spacing in GRIDS.items():
            per_scan = {
                p.name: round_trip_dice(DATA / folder / "images" / p.name, p, spacing) for p in labels
            }
            row[grid] = {"mean_dice": round(float(np.mean(list(per_scan.values()))), 4), "scans": per_scan}
        report["domains"][domain] = row
        cells = " | ".join(
            f"{row[g]['mean_dice']:.3f} (min {min(row[g]['scans'].values()):.3f})" for g in GRIDS
        )
        print(f"| {domain} | {len(labels)} | {cells} |", flush=True)
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
