"""Predictions files, written batch by batch in row order: classification CSV (with probabilities),
token-classification CoNLL ('word [gold] predicted'), and the streaming loop that predicts a large
unlabelled file in file order without holding more than one gathered batch."""
from __future__ import annotations

import csv
from typing import Optional

import numpy as np
import torch

from .. import progress
from ..data.loading import column_arrays
from ..task import PredictionWriter
from ..training.evaluation import concat


class CsvPredictions(PredictionWriter):
    """row_id, the text columns, gold, predicted (and prob_<class> per class; regression: the value)."""

    def __init__(self, path: str, raw, text_columns: list, class_names: Optional[list]):
        super().__init__(path)
        self.raw, self.cols, self.names = raw, text_columns, class_names
        self.by_row = {r: i for i, r in enumerate(column_arrays(raw, "row_id")["row_id"].tolist())}
        self.out = csv.writer(self.fh)
        probs = [] if class_names is None else [f"prob_{c}" for c in class_names]
        self.out.writerow(["row_id", *self.cols, "gold", "predicted", *probs])

    def add(self, outputs: dict) -> None:
        order = np.argsort(outputs["row_id"], kind="stable")
        rows = outputs["row_id"][order].astype(int)
        texts = self.raw.select([self.by_row[r] for r in rows]).select_columns(self.cols).to_dict()
        logits = outputs["logits"][order]
        gold = outputs["labels"][order] if "labels" in outputs else None
        if self.names is None:  # regression
            for i, r in enumerate(rows):
                g = "" if gold is None else f"{gold[i]:.6g}"
                self.out.writerow([r, *(texts[c][i] for c in self.cols), g, f"{logits[i, 0]:.6g}"])
            return
        probs = torch.softmax(torch.from_numpy(logits).float(), -1).numpy()
        for i, r in enumerate(rows):
            # a label the model does not know (--allow_unseen_labels) has an id past its classes
            g = "" if gold is None else (self.names[int(gold[i])] if gold[i] < len(self.names) else "(unseen)")
            self.out.writerow([r, *(texts[c][i] for c in self.cols), g, self.names[int(probs[i].argmax())],
                               *(f"{p:.6f}" for p in probs[i])])


class ConllPredictions(PredictionWriter):
    """'word gold predicted' per line (no gold column for unlabelled data), a blank line between sentences,
    in file order. A sentence's windows may span batches: the last sentence of a batch waits for the next
    one (when streaming, batches arrive in file order)."""

    KEYS = ("predictions", "word_ids", "row_id")

    def __init__(self, path: str, labels: list, words: list, gold: list):
        super().__init__(path)
        self.labels, self.words, self.gold = labels, words, gold
        self.pending: Optional[dict] = None

    def add(self, outputs: dict) -> None:
        if self.pending is not None:
            outputs = {k: concat([self.pending[k], outputs[k]], -100 if k == "predictions" else -1)
                       for k in self.KEYS}
        order = np.argsort(outputs["row_id"], kind="stable")
        outputs = {k: outputs[k][order] for k in self.KEYS}
        keep = outputs["row_id"] == outputs["row_id"].max()
        self.pending = {k: v[keep] for k, v in outputs.items()}
        self._write({k: v[~keep] for k, v in outputs.items()})

    def _write(self, out: dict) -> None:
        for r in np.unique(out["row_id"]).astype(int):
            at = out["row_id"] == r
            ids, preds = out["word_ids"][at], out["predictions"][at]
            pred = np.full(len(self.words[r]), -1, dtype=np.int64)
            pred[ids[ids >= 0]] = preds[ids >= 0]
            gold = self.gold[r]
            for j, word in enumerate(self.words[r]):
                label = self.labels[pred[j]] if pred[j] >= 0 else "O"  # a word no window placed: 'O'
                self.fh.write(f"{word} {label}\n" if gold is None else f"{word} {gold[j]} {label}\n")
            self.fh.write("\n")

    def close(self) -> None:
        if self.pending is not None:
            self._write(self.pending)
        super().close()


def stream_predictions(model, objective, loader, accelerator, writer: Optional[PredictionWriter]) -> int:
    """Collective: predict a prepared loader in file order, handing each gathered batch to the writer
    (main process) as it comes; returns the number of rows. Nothing but one batch is held."""
    model.eval()
    rows = 0
    with torch.inference_mode():
        for batch in progress.track(loader, "predict"):
            outs = objective.eval_outputs(model, batch)
            for key, pad in objective.eval_pad_values.items():
                if key in outs:
                    outs[key] = accelerator.pad_across_processes(outs[key], dim=1, pad_index=pad)
            outs = {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                    for k, v in accelerator.gather_for_metrics(outs).items()}
            rows += len(next(iter(outs.values())))
            if writer is not None:
                writer.add(outs)
    return rows
