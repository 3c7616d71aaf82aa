"""Offline metrics (scikit-learn, scipy); inputs are already gathered across processes."""
from __future__ import annotations

import math

import numpy as np

LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae")


def greater_is_better(metric: str) -> bool:
    return not any(token in metric.lower() for token in LOWER_IS_BETTER)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, matthews_corrcoef, precision_recall_fscore_support

    ids = list(range(num_labels))
    out = {"accuracy": float(accuracy_score(labels, preds))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=ids, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    if num_labels == 2:
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=[1], average="binary", pos_label=1,
                                                     zero_division=0)
        out.update({"precision": float(p), "recall": float(r), "f1": float(f)})
    else:
        out["f1"] = out["f1_macro"]
    out["mcc"] = float(matthews_corrcoef(labels, preds)) if len(labels) else 0.0
    out["confusion_matrix"] = confusion_matrix(labels, preds, labels=ids).tolist()
    return out


def regression_metrics(labels: np.ndarray, preds: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    mse = float(np.mean((preds - labels) ** 2)) if len(labels) else math.nan
    constant = len(labels) < 2 or np.std(labels) == 0 or np.std(preds) == 0
    return {
        "mse": mse,
        "rmse": math.sqrt(mse) if mse == mse else math.nan,
        "mae": float(np.mean(np.abs(preds - labels))) if len(labels) else math.nan,
        "pearson": math.nan if constant else float(pearsonr(preds, labels)[0]),
        "spearman": math.nan if constant else float(spearmanr(preds, labels)[0]),
    }
