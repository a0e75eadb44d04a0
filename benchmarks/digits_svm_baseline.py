"""The anchor for the digits recipe: a tuned RBF support-vector machine on the same split.

    PYTHONPATH=src python benchmarks/digits_svm_baseline.py

Grid-searches C and gamma by accuracy on vitlab's digits val split (seed 0), refits on
train + val, and prints the test accuracy next to what `vitlab train` reports.
"""

from __future__ import annotations

import numpy as np
from sklearn.svm import SVC

from vitlab.datasets import DigitsDataset


def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    ds = DigitsDataset(split)
    return ds.images.reshape(len(ds), -1).numpy(), np.asarray(ds.targets)


def main() -> None:
    (xtr, ytr), (xva, yva), (xte, yte) = arrays("train"), arrays("val"), arrays("test")
    best = max(
        ((SVC(C=c, gamma=g).fit(xtr, ytr).score(xva, yva), c, g) for c in (1, 3, 10, 30, 100)
         for g in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)),
        key=lambda t: t[0],
    )
    _, c, g = best
    svm = SVC(C=c, gamma=g).fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    acc = 100 * svm.score(xte, yte)
    print(f"RBF SVM (C={c}, gamma={g}, chosen on val): test accuracy {acc:.2f}% on {len(yte)} images")


if __name__ == "__main__":
    main()
