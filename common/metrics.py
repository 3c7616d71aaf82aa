"""Offline metrics (scikit-learn, scipy); inputs are already gathered across processes."""
from __future__ import annotations

import math

import numpy as np

LOWER_IS_BETTER = ("loss", "perplexity", "mse", "rmse", "mae")
# What each evaluation reports as a number (the names --metric_for_best_model may take), known before training.
REGRESSION_METRICS = ("loss", "mse", "rmse", "mae", "pearson", "spearman")
NER_METRICS = ("loss", "f1", "precision", "recall", "accuracy")
MLM_METRICS = ("loss", "perplexity", "masked_accuracy")


def classification_names(regression: bool, num_labels: int) -> tuple:
    if regression:
        return REGRESSION_METRICS
    binary = ("precision", "recall") if num_labels == 2 else ()
    return ("loss", "accuracy", "f1", *binary, "mcc", "precision_macro", "recall_macro", "f1_macro",
            "precision_weighted", "recall_weighted", "f1_weighted")


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
        # the positive class alone (= average="binary", which also takes labels the model does not know,
        # counted as errors under --allow_unseen_labels)
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=[1], average="micro", zero_division=0)
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


def _entities(sequences: list, scheme) -> list[set]:
    """Per sentence, the set of (type, start, end) entities; conlleval rules, or strict with a scheme."""
    if scheme is None:
        from seqeval.metrics.sequence_labeling import get_entities

        return [set(get_entities(list(seq))) for seq in sequences]
    from seqeval.scheme import Entities

    found = Entities([list(s) for s in sequences], scheme).entities
    return [{(e.tag, e.start, e.end - 1) for e in sent} for sent in found]


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def ner_metrics(gold: list, pred: list, scheme: str | None = None) -> dict:
    """Entity-level micro precision/recall/F1 (seqeval's entity extraction), per-type P/R/F1/support,
    and word-level accuracy. `scheme` 'IOB2'/'IOBES' = seqeval strict mode (an entity must begin with
    B-/S- and be well formed); None = conlleval's lenient rules (an I- after O starts an entity)."""
    if scheme is not None:
        from seqeval import scheme as schemes

        scheme = getattr(schemes, scheme)
    gold_sets, pred_sets = _entities(gold, scheme), _entities(pred, scheme)
    types = sorted({e[0] for s in gold_sets + pred_sets for e in s})
    counts = {t: [0, 0, 0] for t in types}  # tp, predicted, gold
    for g, p in zip(gold_sets, pred_sets):
        for e in g & p:
            counts[e[0]][0] += 1
        for e in p:
            counts[e[0]][1] += 1
        for e in g:
            counts[e[0]][2] += 1
    tp, n_pred, n_gold = (sum(c[i] for c in counts.values()) for i in range(3))
    precision, recall, f1 = _prf(tp, n_pred, n_gold)
    per_type = {}
    for t, (t_tp, t_pred, t_gold) in counts.items():
        p, r, f = _prf(t_tp, t_pred, t_gold)
        per_type[t] = {"precision": p, "recall": r, "f1": f, "support": t_gold}
    words = sum(len(s) for s in gold)
    correct = sum(int(a == b) for g, p in zip(gold, pred) for a, b in zip(g, p))
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": correct / words if words else 0.0,
            "num_gold_entities": n_gold, "num_predicted_entities": n_pred, "per_type": per_type}
