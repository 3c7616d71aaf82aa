"""Offline metrics (NumPy; scipy for regression, seqeval's schemes for strict NER); inputs are already gathered across
processes."""
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


def _counts(labels: np.ndarray, preds: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Confusion counts over `classes` (rows: gold, columns: predicted); pairs with another value are left out."""
    index = {int(c): i for i, c in enumerate(classes)}
    g = np.array([index.get(int(x), -1) for x in labels], dtype=np.int64)
    p = np.array([index.get(int(x), -1) for x in preds], dtype=np.int64)
    keep = (g >= 0) & (p >= 0)
    n = len(classes)
    return np.bincount(g[keep] * n + p[keep], minlength=n * n).reshape(n, n)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict:
    """Accuracy, per-class precision/recall/F1 averaged (macro, weighted by support), the positive class's for
    two labels, Matthews' correlation and the confusion matrix: scikit-learn's definitions (zero_division=0),
    in NumPy (tests/test_units.py compares them), so an evaluation does not wait 1.2 s for scikit-learn and
    scipy to import. Gold labels outside 0..num_labels-1 (--allow_unseen_labels) count as errors."""
    labels, preds = np.asarray(labels).astype(np.int64), np.asarray(preds).astype(np.int64)
    ids = np.arange(num_labels)
    out = {"accuracy": float(np.mean(labels == preds)) if len(labels) else 0.0}
    tp = np.array([np.sum((labels == c) & (preds == c)) for c in ids])
    predicted = np.array([np.sum(preds == c) for c in ids])
    support = np.array([np.sum(labels == c) for c in ids])
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, predicted + support)
    weights = _ratio(support, np.full(num_labels, support.sum()))
    for avg, w in (("macro", np.full(num_labels, 1 / num_labels)), ("weighted", weights)):
        out.update({f"precision_{avg}": float(precision @ w), f"recall_{avg}": float(recall @ w),
                    f"f1_{avg}": float(f1 @ w)})
    if num_labels == 2:  # the positive class alone
        out.update({"precision": float(precision[1]), "recall": float(recall[1]), "f1": float(f1[1])})
    else:
        out["f1"] = out["f1_macro"]
    # Matthews (Gorodkin's K-category form) over every value seen, gold or predicted
    cm = _counts(labels, preds, np.union1d(labels, preds)).astype(np.float64)
    gold_sum, pred_sum, n = cm.sum(axis=1), cm.sum(axis=0), cm.sum()
    cov_gp = np.trace(cm) * n - gold_sum @ pred_sum
    cov_pp, cov_gg = n * n - pred_sum @ pred_sum, n * n - gold_sum @ gold_sum
    out["mcc"] = float(cov_gp / math.sqrt(cov_gg * cov_pp)) if cov_gg * cov_pp > 0 else 0.0
    out["confusion_matrix"] = _counts(labels, preds, ids).tolist()
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


# conlleval's tag letters: after E-/S- an entity has ended; B-/I- go on; before B-/S-/O one ends; B-/S- open one;
# I-/E- open one after O, E- or S-; a change of type opens or closes one unless the tag is O (or conlleval's '.').
_ENDS_AFTER, _GOES_ON, _CLOSES, _OPENS = frozenset("ES"), frozenset("BI"), frozenset("BSO"), frozenset("BS")
_CONTINUES, _AFTER_NONE, _OUTSIDE = frozenset("EI"), frozenset("ESO"), frozenset("O.")


def conlleval_entities(tags) -> set:
    """The (type, first, last) entities of one sentence's tags by conlleval's rules, as seqeval's get_entities
    finds them (tests/test_ner.py compares the two): an entity ends after E-/S-, before B-/S-/O, or where the
    type changes; it starts at B-/S-, at an I-/E- after O, E- or S-, or where the type changes. Here rather than
    seqeval's: importing seqeval.metrics imports scikit-learn, 0.75 s of every NER run."""
    found, start, prev, prev_type = set(), 0, "O", ""
    for i, label in enumerate([*tags, "O"]):
        tag, kind = label[:1], label[1:].split("-", 1)[-1] or "_"
        other = kind != prev_type
        if prev in _ENDS_AFTER or (prev in _GOES_ON and tag in _CLOSES) or (other and prev not in _OUTSIDE):
            found.add((prev_type, start, i - 1))
        if tag in _OPENS or (tag in _CONTINUES and prev in _AFTER_NONE) or (other and tag not in _OUTSIDE):
            start = i
        prev, prev_type = tag, kind
    return found


def _entities(sequences: list, scheme) -> list[set]:
    """Per sentence, the set of (type, start, end) entities; conlleval rules, or strict with a scheme."""
    if scheme is None:
        return [conlleval_entities(seq) for seq in sequences]
    from seqeval.scheme import Entities  # seqeval.scheme alone imports nothing heavy

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
