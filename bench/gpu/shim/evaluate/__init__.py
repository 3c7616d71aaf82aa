"""An offline stand-in for the `evaluate` package, for the official example scripts on a machine without it.

`evaluate.load(name)` fetches metric code from the Hugging Face Hub, which the GPU machine cannot reach, and the
package is not installed there. The official `run_glue_no_trainer.py` and `run_ner_no_trainer.py` use three metrics
through `load(...)`, `add_batch(predictions=..., references=...)` and `compute()`; this module gives the same
results from scikit-learn and seqeval:

- `load("accuracy")`: {"accuracy"} (what the GLUE script loads for csv/json files);
- `load("glue", "mrpc")` (and qqp): {"accuracy", "f1"}; other GLUE configurations: {"accuracy"};
- `load("seqeval")`: per entity type {"precision", "recall", "f1", "number"} and overall_precision/recall/f1/accuracy
  (conlleval's lenient rules, seqeval's default, micro averages).

Put `bench/gpu/shim` first on PYTHONPATH for those runs only (bench/gpu/run.sh does).
"""
from __future__ import annotations

__version__ = "0.0.0+gpubench-shim"


def _plain(values) -> list:
    """Tensors (CUDA included), arrays and lists as plain Python lists."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


class Metric:
    """Collects predictions and references batch by batch; compute() scores them and starts over."""

    def __init__(self, name: str, config_name: str | None = None):
        self.name, self.config_name = name, config_name
        self._predictions: list = []
        self._references: list = []

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        self._predictions.extend(_plain(predictions))
        self._references.extend(_plain(references))

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        self._predictions.append(prediction)
        self._references.append(reference)

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict:
        if predictions is not None:
            self.add_batch(predictions=predictions, references=references)
        preds, refs = self._predictions, self._references
        self._predictions, self._references = [], []
        return self._score(preds, refs)

    def _score(self, preds: list, refs: list) -> dict:
        from sklearn.metrics import accuracy_score, f1_score

        scores = {"accuracy": float(accuracy_score(refs, preds))}
        if self.name == "glue" and self.config_name in ("mrpc", "qqp"):
            scores["f1"] = float(f1_score(refs, preds))
        return scores


class SeqevalMetric(Metric):
    def _score(self, preds: list, refs: list) -> dict:
        from seqeval.metrics import accuracy_score, classification_report

        report = classification_report(refs, preds, output_dict=True, zero_division=0)
        micro = report.pop("micro avg")
        scores = {}
        for kind, row in report.items():
            if kind.endswith(" avg"):
                continue
            scores[kind] = {"precision": float(row["precision"]), "recall": float(row["recall"]),
                            "f1": float(row["f1-score"]), "number": int(row["support"])}
        scores.update(overall_precision=float(micro["precision"]), overall_recall=float(micro["recall"]),
                      overall_f1=float(micro["f1-score"]), overall_accuracy=float(accuracy_score(refs, preds)))
        return scores


GLUE_CONFIGS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")


def load(path: str, config_name: str | None = None, **kwargs) -> Metric:
    """The metric `path` names (accuracy, glue with a configuration, seqeval); anything else is refused."""
    if path == "accuracy":
        return Metric(path)
    if path == "glue" and config_name in GLUE_CONFIGS and config_name != "stsb":
        return Metric(path, config_name)
    if path == "seqeval":
        return SeqevalMetric(path)
    raise ValueError(f"evaluate shim (bench/gpu/shim): no offline metric {path!r} {config_name or ''}; it has "
                     "accuracy, glue (classification configurations) and seqeval.")
