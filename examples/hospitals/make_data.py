"""Split scikit-learn's bundled 8x8 digit images among 5 hospitals with label skew.

Each site gets classes in proportions drawn from Dir(alpha): some hospitals see mostly a few
classes, as imaging sites do. Writes data/hospitalN/{x,y}.npy next to this file.
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from shoal.federated.partition import partition


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha: smaller means more skew")
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    args = parser.parse_args()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel intensities 0..16 -> 0..1
    y = digits.target.astype(np.int64)
    for i, ids in enumerate(partition(y, args.sites, "dirichlet", alpha=args.alpha, seed=7), start=1):
        ids = np.random.default_rng(i).permutation(ids)  # the held-out tail must not be one class
        folder = Path(args.out) / f"hospital{i}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "x.npy", x[ids])
        np.save(folder / "y.npy", y[ids])
        counts = np.bincount(y[ids], minlength=10)
        print(f"{folder}: {len(ids)} images, per class {counts.tolist()}")


if __name__ == "__main__":
    main()
