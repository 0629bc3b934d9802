"""Write a small BraTS-shaped data set: NIfTI subjects with four modalities and a label CSV.

    python examples/data/make_brats_like.py DIR [--subjects 40] [--side 32]

DIR/SUBJECT/SUBJECT_{t1,t1ce,t2,flair}.nii.gz per subject (BraTS's layout), DIR/labels.csv
(``subject,label``: ``tumour`` or ``healthy``, balanced). Half the subjects are stored with a RAS
affine, half with an LPS one (the voxels flipped to match), and the voxel spacing alternates
between 1 mm and 1.5 mm, so a study must orient and resample them (the study's MONAI transforms do).
Every subject is a noisy ellipsoid "brain"; a tumour subject carries a bright blob (strongest in
t1ce and flair) at a random place inside it: the class signal a feature extractor can find.
Nothing is downloaded; the same seed writes the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
BLOB_GAIN = {"t1": 0.3, "t1ce": 1.2, "t2": 0.6, "flair": 1.0}


def subject_volumes(generator: np.random.Generator, side_mm: float, spacing: float, tumour: bool) -> dict:
    """The four modalities of one subject on a grid of ``spacing`` mm covering ``side_mm``."""
    count = round(side_mm / spacing)
    axis = (np.arange(count) + 0.5) * spacing - side_mm / 2
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    radius = side_mm * 0.4
    brain = (x / radius) ** 2 + (y / (0.85 * radius)) ** 2 + (z / (0.75 * radius)) ** 2 < 1
    centre = generator.uniform(-0.4, 0.4, 3) * radius
    blob = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * (0.15 * radius) ** 2))
    volumes = {}
    for number, modality in enumerate(MODALITIES):
        tissue = 1.0 + 0.2 * number + 0.15 * np.sin(x / 3 + number) * np.cos(y / 4)
        image = brain * (tissue + generator.normal(0, 0.1, brain.shape))
        if tumour:
            image = image + brain * BLOB_GAIN[modality] * blob
        volumes[modality] = (100 * np.clip(image, 0, None)).astype(np.float32)
    return volumes


def write_dataset(folder: Path, subjects: int = 40, side_mm: float = 32.0, seed: int = 0) -> Path:
    """Write the data set (module doc); returns the label CSV's path."""
    import nibabel

    generator = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["subject,label"]
    for number in range(subjects):
        subject = f"BraTS-like-{number:03d}"
        tumour = number % 2 == 1
        # every combination of spacing and orientation, for both classes alike
        spacing = 1.0 if (number // 2) % 2 == 0 else 1.5
        lps = ((number + 1) // 2) % 2 == 1
        for modality, volume in subject_volumes(generator, side_mm, spacing, tumour).items():
            affine = np.diag([spacing, spacing, spacing, 1.0])
            if lps:  # the same anatomy, stored with x and y running the other way
                volume = volume[::-1, ::-1, :].copy()
                affine[0, 0] = affine[1, 1] = -spacing
                affine[:2, 3] = spacing * (volume.shape[0] - 1)
            (folder / subject).mkdir(exist_ok=True)
            nibabel.Nifti1Image(volume, affine).to_filename(str(folder / subject / f"{subject}_{modality}.nii.gz"))
        rows.append(f"{subject},{'tumour' if tumour else 'healthy'}")
    labels = folder / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--side", type=float, default=32.0, help="field of view in mm (cube)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    labels = write_dataset(args.folder, args.subjects, args.side, args.seed)
    print(f"wrote {args.subjects} subjects x {len(MODALITIES)} modalities and {labels}")


if __name__ == "__main__":
    main()
