"""scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1797 8x8 grey images, 10 classes, shipped
with scikit-learn, nothing downloaded) written as an image folder that ``--data-dir`` reads:

    python -m examples.classification.digits OUT_DIR [--image-size 32] [--val-fraction 0.25] [--seed 0]

gives ``OUT_DIR/train/<digit>/<index>.png`` and ``OUT_DIR/val/<digit>/<index>.png`` (a stratified split; images
upscaled bilinearly from 8x8 to ``image-size``). A real, tiny data set for trying the own-data commands and for
``examples/digits_check.py``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["write_digits_folder", "main"]


def write_digits_folder(root, image_size: int = 32, val_fraction: float = 0.25, seed: int = 0) -> Dict[str, int]:
    """Write the digits as ``root/{train,val}/<digit>/<index>.png`` (8-bit grey PNGs of ``image_size`` squared).

    Args:
        root: output folder (created; existing files of the same names are overwritten).
        image_size: side of the written images (>= 8; 8 keeps the originals).
        val_fraction: share of every class in ``val/`` (stratified split, in (0, 1)).
        seed: seed of the split.

    Returns:
        ``{"train": n_train, "val": n_val}``; ``root/digits.json`` records the arguments.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if int(image_size) < 8:
        raise ValueError(f"write_digits_folder: `image_size` must be >= 8, got {image_size}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"write_digits_folder: `val_fraction` must be in (0, 1), got {val_fraction}")
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    index = np.arange(len(images))
    train_idx, val_idx = train_test_split(index, test_size=float(val_fraction), random_state=int(seed),
                                          stratify=digits.target)
    root = Path(root).expanduser()
    counts = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for i in sorted(int(j) for j in idx):
            d = root / split / str(int(digits.target[i]))
            d.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L")
            if int(image_size) != 8:
                img = img.resize((int(image_size), int(image_size)), Image.BILINEAR)
            img.save(d / f"{i:04d}.png")
        counts[split] = int(len(idx))
    with open(root / "digits.json", "w") as f:
        json.dump({"source": "sklearn.datasets.load_digits", "image_size": int(image_size),
                   "val_fraction": float(val_fraction), "seed": int(seed), **counts}, f, indent=2)
    return counts


def main(argv: Optional[List[str]] = None) -> Dict[str, int]:
    p = argparse.ArgumentParser(prog="python -m examples.classification.digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (gets train/ and val/)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = write_digits_folder(args.out, args.image_size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train / {counts['val']} val digit images to {args.out}")
    return counts


if __name__ == "__main__":
    main()
