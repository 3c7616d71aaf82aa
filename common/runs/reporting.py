"""Everything a run writes into output_dir besides checkpoints: results.json, the resolved
settings, log history, predictions and a model card. JSON only, never pickle; atomic writes."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import yaml

from ..data.validate import check_output_path
from ..errors import UserError
from ..files import honour_umask

RESULTS = "results.json"
LOG_HISTORY = "log_history.jsonl"
RESOLVED = "training_args.yaml"


class TimeSplit:
    """A run's wall time as named parts that add up to its total by construction: `lap(name)` gives `name` every
    second since the previous lap, and `move` relabels seconds timed inside a part (the evaluations and
    checkpoints inside the training loop). `parts`: parts measured before this split started (startup, launch);
    `started`: when its first lap began (perf_counter; default now); `names`: the parts it will have, in order
    (each listed even when it stays at 0)."""

    def __init__(self, parts: Optional[dict] = None, started: Optional[float] = None, names: tuple = ()):
        self.parts = dict(parts or {}) | {name: 0.0 for name in names}
        self.last = time.perf_counter() if started is None else started

    def lap(self, name: str) -> float:
        """The seconds since the previous lap, added to `name`."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.parts[name] = self.parts.get(name, 0.0) + seconds
        return seconds

    def move(self, seconds: float, source: str, target: str) -> None:
        self.parts[source] -= seconds
        self.parts[target] = self.parts.get(target, 0.0) + seconds

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars -> python, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, AttributeError):
            obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        honour_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")


def check_output_dir(output_dir: str, overwrite: bool, resume: Optional[str]) -> None:
    """Fail before anything is written: the folder must be creatable and writable (validate.check_output_path),
    and a non-empty output_dir needs --overwrite_output_dir (or a resume)."""
    check_output_path(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        finished = os.path.isfile(os.path.join(output_dir, RESULTS))
        if resume is None:
            raise UserError(f"--output_dir '{output_dir}' is not empty; pass --overwrite_output_dir to replace it, "
                            "--resume_from_checkpoint latest to continue it, or choose another folder.")
        if finished and resume in ("latest", "auto") and not os.path.isdir(os.path.join(output_dir, "checkpoints")):
            raise UserError(f"--output_dir '{output_dir}' holds a finished run with no checkpoints to resume; "
                            "pass --overwrite_output_dir or choose another folder.")


def clear_folder(folder: str) -> None:
    """Remove everything in `folder` (links themselves, not what they point to); the folder stays."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


def start_output_dir(output_dir: str, overwrite: bool, resuming: bool, is_main: bool) -> None:
    """Create output_dir; a fresh (non-resumed) run clears what an earlier run left there."""
    if not is_main:
        return
    os.makedirs(output_dir, exist_ok=True)
    if overwrite and not resuming:
        clear_folder(output_dir)
    elif not resuming:
        for stale in (LOG_HISTORY, RESULTS):
            if os.path.exists(os.path.join(output_dir, stale)):
                os.unlink(os.path.join(output_dir, stale))


class LogWriter:
    """Appends each log record to output_dir/log_history.jsonl (main process only). A resumed run passes the
    checkpoint's records (`carried`): the file is rewritten to hold exactly those first, whichever folder the
    checkpoint came from, so the steps after the checkpoint are not logged twice."""

    def __init__(self, output_dir: str, carried: Optional[list] = None):
        self.path = os.path.join(output_dir, LOG_HISTORY)
        if carried is not None:
            write_text_atomic(self.path, "".join(json.dumps(_clean(record)) + "\n" for record in carried))

    def __call__(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")


def save_resolved_config(output_dir: str, settings: dict) -> None:
    write_text_atomic(os.path.join(output_dir, RESOLVED),
                      "# Resolved settings of this run; reusable with --config.\n"
                      + yaml.safe_dump(_clean(settings), sort_keys=False))


def write_model_card(output_dir: str, *, task: str, base_model: str, data: str, results: dict,
                     labels: Optional[list] = None, pipeline_task: str, example: str,
                     distillation: Optional[dict] = None, student_from_layers: Optional[list] = None) -> None:
    lines = [f"# {os.path.basename(os.path.abspath(output_dir))}", "",
             f"Fine-tuned from `{base_model}` for {task} on {data}.", ""]
    if student_from_layers:
        lines += [f"A student built from layers {', '.join(map(str, student_from_layers))} of `{base_model}` "
                  "(embeddings and the rest copied).", ""]
    if distillation:
        d = distillation
        parts = ([f"prediction layer (alpha {d['alpha']}, temperature {d['temperature']})"] if d["prediction"] else [])
        parts += [f"intermediate layers ({', '.join(d['intermediate'])}; layer map {d['layer_map']})"] if d[
            "intermediate"] else []
        lines += [f"Distilled from the teacher `{d['teacher']}` ({d['teacher_layers']} layers, hidden size "
                  f"{d['teacher_hidden_size']}): {'; '.join(parts)}.", ""]
    if labels:
        lines += [f"Labels: {', '.join(map(str, labels))}.", ""]
    for split in ("eval", "test"):
        metrics = results.get(split) or {}
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            lines += [f"## {split} metrics", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
            lines.append("")
    setup = results.get("setup", {})
    lines += ["## Training", "",
              f"{setup.get('num_processes', 1)} process(es), {setup.get('distributed_type', '')}, "
              f"mixed precision {setup.get('mixed_precision', '')}, device {setup.get('device', '')}; "
              f"{results.get('train', {}).get('global_step', '?')} optimizer steps in "
              f"{results.get('train', {}).get('train_runtime', 0):.1f} s. Settings: `training_args.yaml`.", "",
              "## Use", "", "```python", "from transformers import pipeline",
              f"pipe = pipeline({pipeline_task!r}, model={output_dir!r})", example, "```", ""]
    write_text_atomic(os.path.join(output_dir, "README.md"), "\n".join(lines))
