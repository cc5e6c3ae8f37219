"""The paper's probe: logistic regression on the global encoder's mu over the real test set,
stratified 80/20 split; accuracy and weighted F1."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split


def linear_probe(features: np.ndarray, labels: np.ndarray, seed: int, max_iter: int = 1000) -> dict:
    x_tr, x_te, y_tr, y_te = train_test_split(features, labels, test_size=0.2, stratify=labels,
                                              random_state=seed)
    clf = LogisticRegression(max_iter=max_iter)
    clf.fit(x_tr, y_tr)
    pred = clf.predict(x_te)
    return {"probe_accuracy": float(accuracy_score(y_te, pred)),
            "probe_f1": float(f1_score(y_te, pred, average="weighted"))}
