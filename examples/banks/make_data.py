"""Generate imbalanced card transactions (about 2% fraud) for 3 banks of different sizes.

scikit-learn's `make_classification` draws 20 features, 8 of them informative; each bank
gets a different number of customers and a slightly different fraud rate. Writes
data/bankN/{x,y}.npy next to this file (label 1 is fraud).
"""

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification

SIZES = (12_000, 6_000, 2_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    args = parser.parse_args()
    x, y = make_classification(n_samples=sum(SIZES) * 2, n_features=20, n_informative=8, n_redundant=4,
                               weights=[0.97, 0.03], class_sep=1.2, flip_y=0.002, random_state=11)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    rng = np.random.default_rng(11)
    fraud, legit = rng.permutation(np.flatnonzero(y == 1)), rng.permutation(np.flatnonzero(y == 0))
    for i, (size, rate) in enumerate(zip(SIZES, (0.02, 0.03, 0.015)), start=1):
        n_fraud = int(size * rate)
        ids = rng.permutation(np.concatenate([fraud[:n_fraud], legit[:size - n_fraud]]))
        fraud, legit = fraud[n_fraud:], legit[size - n_fraud:]
        folder = Path(args.out) / f"bank{i}"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "x.npy", x[ids])
        np.save(folder / "y.npy", y[ids].astype(np.int64))
        print(f"{folder}: {size} transactions, {n_fraud} fraudulent")


if __name__ == "__main__":
    main()
