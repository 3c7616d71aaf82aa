"""Which rows of the training file go where: derived validation/test splits (seeded, stratified
when labels are given) and k-fold selections. Classification and NER use the same plan, so a
seed or a fold selects rows of one tokenized training file and nothing is tokenized twice."""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import UserError
from ..stats import kfold_indices
from .loading import split_indices

EVAL_FILE_FLAGS = {"validation": "--validation_file", "test": "--test_file"}


def plan_rows(n: int, split, seed: int, given: set, validation_split: float, test_split: float = 0.0,
              max_train_samples: Optional[int] = None, labels: Optional[np.ndarray] = None,
              what: str = "training rows") -> dict:
    """Row indices of the training file for "train" and each derived split.

    Single runs and seeds: --test_split then --validation_split, both fractions of the training file,
    for the splits not `given` as files. K-fold (`split.kfold`): the held-out fold is the test split;
    --validation_split of the other folds is the inner validation split that picks the best model;
    the held-out fold never does. `split` is a plan.SplitPlan or None (a single run)."""
    rows = np.arange(n)
    out = {}
    if split is not None and split.kfold:
        for name, flag in EVAL_FILE_FLAGS.items():
            if name in given:
                raise UserError(f"--kfold holds out folds of --train_file as test sets and draws validation from the "
                                f"other folds; drop {flag} (or run without --kfold).")
        if split.kfold > n:
            raise UserError(f"--kfold {split.kfold} is more folds than the {n} {what}.")
        rows, out["test"] = kfold_indices(n, split.kfold, split.fold, seed, labels)
        if validation_split > 0:
            keep, take = split_indices(len(rows), validation_split, seed + 1, None if labels is None else labels[rows],
                                       "--validation_split", what)
            out["validation"], rows = rows[take], rows[keep]
    else:
        if "test" not in given and test_split > 0:
            keep, take = split_indices(n, test_split, seed, labels, "--test_split", what)
            out["test"], rows = take, keep
        if "validation" not in given and validation_split > 0:
            fraction = validation_split / (1 - (test_split if "test" in out else 0))
            if fraction >= 1:
                raise UserError(f"--validation_split {validation_split} and --test_split {test_split} leave no "
                                "training data; their sum must be below 1.")
            keep, take = split_indices(len(rows), fraction, seed + 1, None if labels is None else labels[rows],
                                       "--validation_split", what)
            out["validation"], rows = rows[take], rows[keep]
    if max_train_samples:
        rows = rows[:max_train_samples]
    out["train"] = rows
    return {k: np.asarray(v) for k, v in out.items()}


def _percent(fraction: float) -> str:
    return f"{round(fraction * 100, 2):g}%"


def split_origins(where: dict, idx: dict, split, seed: int, validation_split: float, test_split: float = 0.0,
                  max_train_samples: Optional[int] = None, stratified: bool = False) -> dict:
    """split -> where its rows came from, for the log: a file or Hub split (`where`: split -> "--test_file 'x'"), or
    held out of the training data (`idx`: plan_rows' selection; `split`: the plan.SplitPlan or None)."""
    out = {s: w for s, w in where.items() if s not in idx}
    if not idx:
        return out
    pool, how = where["train"], f"{', stratified' if stratified else ''}, seed {seed}"
    if split is not None and split.kfold:
        out["test"] = f"held-out fold {split.fold + 1} of {split.kfold} of {pool}{how}"
        if "validation" in idx:
            out["validation"] = f"{_percent(validation_split)} of the other folds{how}"
    else:
        if "test" in idx:
            out["test"] = f"{_percent(test_split)} held out of {pool}{how}"
        if "validation" in idx:
            out["validation"] = f"{_percent(validation_split)} held out of {pool}{how}"
    rest = f"the rest of {pool}" if len(idx) > 1 else pool
    out["train"] = rest + (f", first {max_train_samples} (--max_train_samples)" if max_train_samples else "")
    return out


def says_all(split, run_seed: Optional[int]) -> bool:
    """Whether a run tells the whole story of its data: a single run, or in a multi-run job (`split`: its
    plan.SplitPlan) the first run of each split (its first fold, the seed that drew it); the others are briefer."""
    return split is None or (split.fold == 0 and split.seed == run_seed)


def data_block(head: str, sizes: dict, origins: dict, split=None, run_seed: Optional[int] = None) -> str:
    """The log's account of a run's data: `head` (the source and the columns used), then each split's size
    (split -> "367 rows") and origin (split_origins); one line of sizes where a multi-run job's run is not the first
    of its split (says_all)."""
    order = [s for s in ("train", "validation", "test") if s in sizes]
    if not says_all(split, run_seed):
        return "data: " + ", ".join(f"{s} {sizes[s]}" for s in order) + (
            f" (held-out fold {split.fold + 1} of {split.kfold})" if split.kfold else "")
    width = max(len(sizes[s]) for s in order) if order else 0
    lines = [f"data: {head}"] + [f"  {s:<10} {sizes[s]:>{width}}: {origins.get(s, '?')}" for s in order]
    return "\n".join(lines)
