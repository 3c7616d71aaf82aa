"""Several runs of one script in one launch: seeds (--seeds / --num_runs), k-fold cross-validation
(--kfold) or both, each run in its own subfolder, then summary.json (mean, sample std, min, max and
the 95% t-interval of every metric), summary.txt and plots in output_dir.

All processes go through the runs in the same order with the same Accelerator (models are freed
between runs); only the main process writes. A killed job restarted with the same command skips
the runs that finished (their results.json exists) and resumes the interrupted one from its latest
checkpoint (or restarts it when it had none).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from typing import Any, Callable, Optional

from ..config import to_jsonable
from ..errors import UserError
from ..log import logger
from ..progress import duration
from ..stats import summarize
from ..task import Context
from ..training.checkpoint import list_checkpoints
from . import plots, reporting
from .plan import PlannedRun
from .single_run import prepare_run, run_single

MANIFEST = "runs.json"
SUMMARY = "summary.json"
SUMMARY_TXT = "summary.txt"
# Shown first in tables and plots when present (the rest of the metrics are in summary.json).
HEADLINE = ("accuracy", "f1", "mcc", "macro_f1", "precision", "recall", "pearson", "spearman", "rmse", "perplexity")


def _manifest(task, settings: dict, runs: list[PlannedRun]) -> dict:
    ignore = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to"}
    return {"task": task.name, "runs": [dataclasses.asdict(r) for r in runs],
            "settings": {k: v for k, v in settings.items() if k not in ignore}}


def holds_other_job(task, model_args, data_args, args, runs: list[PlannedRun]) -> bool:
    """Whether output_dir holds a multi-run job with other settings or runs than these (which run_all refuses
    without --overwrite_output_dir)."""
    old = _load(os.path.join(args.output_dir, MANIFEST))
    manifest = _manifest(task, to_jsonable(model_args, data_args, args), runs)
    return old is not None and old != json.loads(json.dumps(reporting._clean(manifest)))


def check_parent(output_dir: str, overwrite: bool, manifest: dict) -> bool:
    """True when output_dir holds an unfinished job with this very plan (continue it)."""
    reporting.check_output_dir(output_dir, True, None)  # file/permission/disk checks
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return False
    path = os.path.join(output_dir, MANIFEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        if old == json.loads(json.dumps(reporting._clean(manifest))):
            return not overwrite
        if not overwrite:
            changed = sorted(k for k in set(old.get("settings", {})) | set(manifest["settings"])
                             if old.get("settings", {}).get(k) != manifest["settings"].get(k))
            what = f"settings {', '.join(changed[:5])} differ" if changed else "the runs differ"
            raise UserError(f"--output_dir '{output_dir}' holds a different multi-run job ({what}); pass "
                            "--overwrite_output_dir to replace it or choose another folder.")
        return False
    if not overwrite:
        raise UserError(f"--output_dir '{output_dir}' is not empty; pass --overwrite_output_dir to replace it, "
                        "or choose another folder.")
    return False


def _run_context(task, model_args, data_args, args, runtime, run: PlannedRun, resume: Optional[str]) -> Context:
    run_args = dataclasses.replace(args, seed=run.seed, output_dir=os.path.join(args.output_dir, run.name),
                                   overwrite_output_dir=True, resume_from_checkpoint=resume, seeds=None, num_runs=1,
                                   kfold=0, resplit_per_seed=False)
    return Context(model_args, data_args, run_args, runtime, split=run.split, run_name=run.name)


def run_all(task, model_args, data_args, args, runtime, runs: list[PlannedRun],
            after_run: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run every planned run (skipping those finished earlier); returns the summary (also in summary.json).
    after_run(i, results), when given, is called on every process after the i-th run (1-based) has its results
    (a study's pruning of a k-fold trial raises from it)."""
    from accelerate.utils import broadcast_object_list

    accelerator = runtime.accelerator
    settings = to_jsonable(model_args, data_args, args)
    manifest = _manifest(task, settings, runs)
    continuing = [check_parent(args.output_dir, args.overwrite_output_dir, manifest)
                  if accelerator.is_main_process else None]
    broadcast_object_list(continuing)
    continuing = bool(continuing[0])
    first = None
    if not continuing:  # the first run's data, model and settings are checked before the folder is touched
        ctx = _run_context(task, model_args, data_args, args, runtime, runs[0], None)
        first = (runs[0].name, ctx, prepare_run(task, ctx))
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if not continuing:
            reporting.clear_folder(args.output_dir)
        reporting.write_json(os.path.join(args.output_dir, MANIFEST), manifest)
        reporting.save_resolved_config(args.output_dir, settings)
    accelerator.wait_for_everyone()
    kind = (f"{args.kfold}-fold cross-validation" if args.kfold else "") + \
           (f"{' x ' if args.kfold else ''}{len(args.run_seeds())} seeds" if len(args.run_seeds()) > 1 else "")
    logger.info("%s: %d runs into %s%s", kind, len(runs), args.output_dir, " (continuing)" if continuing else "")

    t0 = time.perf_counter()
    per_run: dict[str, dict] = {}
    earlier = 0
    for i, run in enumerate(runs, 1):
        sub = os.path.join(args.output_dir, run.name)
        finished = [_load(os.path.join(sub, reporting.RESULTS)) if accelerator.is_main_process else None]
        broadcast_object_list(finished)
        if finished[0] is not None:
            logger.info("run %d/%d (%s): finished earlier, skipped", i, len(runs), run.name)
            per_run[run.name] = finished[0]
            earlier += 1
            if after_run is not None:
                after_run(i, finished[0])
            continue
        has_ckpt = [bool(list_checkpoints(os.path.join(sub, "checkpoints"))) if accelerator.is_main_process else None]
        broadcast_object_list(has_ckpt)
        resume = "latest" if has_ckpt[0] else None
        logger.info("run %d/%d (%s): seed %d%s%s", i, len(runs), run.name, run.seed,
                    f", held-out fold {run.split.fold + 1} of {run.split.kfold}" if run.split.kfold else "",
                    ", resuming its latest checkpoint" if resume else "")
        if first is not None and first[0] == run.name:
            per_run[run.name] = run_single(task, first[1], first[2])
            first = None
        else:
            per_run[run.name] = run_single(task, _run_context(task, model_args, data_args, args, runtime, run, resume))
        accelerator.free_memory()
        gc.collect()
        if after_run is not None:
            after_run(i, per_run[run.name])

    summary = summarize_runs(runs, per_run, args, time.perf_counter() - t0, earlier)
    if accelerator.is_main_process:
        reporting.write_json(os.path.join(args.output_dir, SUMMARY), summary)
        table = format_table(summary)
        reporting.write_text_atomic(os.path.join(args.output_dir, SUMMARY_TXT), table + "\n")
        draw_summary_plots(summary, per_run, args.output_dir)
        print("\n" + table, flush=True)
        logger.info("\n".join(job_last_lines(summary, args.output_dir)))
    accelerator.wait_for_everyone()
    return summary


def _load(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def run_metrics(results: dict) -> dict:
    """Flat numeric metrics of one run: eval_*, test_*, and timings."""
    out = {}
    for split in ("eval", "test"):
        for k, v in (results.get(split) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{split}_{k}"] = v
    train, timing = results.get("train", {}), results.get("timing", {})
    out["train_seconds"] = timing.get("train_seconds")
    out["total_seconds"] = timing.get("total_seconds")
    out["best_step"] = train.get("best_step")
    out["global_step"] = train.get("global_step")
    return {k: v for k, v in out.items() if v is not None}


def summarize_runs(runs: list[PlannedRun], per_run: dict, args, seconds: float, earlier: int = 0) -> dict:
    """seconds: this invocation's time; earlier: runs found finished by an earlier invocation (resumed job)."""
    rows = []
    for run in runs:
        res = per_run[run.name]
        rows.append({"name": run.name, "seed": run.seed, "fold": run.split.fold + 1 if run.split.kfold else None,
                     "split_seed": run.split.seed, "metrics": run_metrics(res)})
    keys = sorted({k for r in rows for k in r["metrics"]})
    metrics = {k: summarize([r["metrics"].get(k) for r in rows]) for k in keys}
    primary = "test" if any(k.startswith("test_") for k in keys) else "eval"
    any_res = next(iter(per_run.values()))
    out: dict[str, Any] = {
        "mode": "kfold" if args.kfold else "seeds", "kfold": args.kfold or None, "seeds": args.run_seeds(),
        "resplit_per_seed": args.resplit_per_seed, "num_runs": len(rows), "primary_split": primary,
        "primary_metric": any_res.get("train", {}).get("metric_for_best_model"),
        "confidence": 0.95, "interval": "Student t, n-1 degrees of freedom, of the mean over runs",
        "metrics": metrics, "runs": rows,
        # the runs' own wall times, whichever invocation ran them; this invocation's time apart
        "total_seconds": sum(r["metrics"].get("total_seconds", 0) for r in rows),
        "total_train_seconds": sum(r["metrics"].get("train_seconds", 0) for r in rows),
        "job_seconds": seconds, "runs_finished_earlier": earlier}
    if args.kfold:
        out["note"] = ("test_* metrics are on each fold's held-out part (every training example held out once); "
                       "eval_* on the inner validation split that chose each fold's best model.")
        cms = [(per_run[r.name].get("test") or {}).get("confusion_matrix") for r in runs]
        if all(cm is not None for cm in cms) and cms:
            import numpy as np

            out["pooled_test_confusion_matrix"] = np.sum(np.asarray(cms), axis=0).tolist()
    return out


def headline(summary: dict, limit: int = 5) -> list[str]:
    prefix = summary["primary_split"] + "_"
    names = [k[len(prefix):] for k in summary["metrics"] if k.startswith(prefix)]
    first = summary.get("primary_metric")
    ordered = ([first] if first in names else []) + [m for m in HEADLINE if m in names and m != first]
    return [prefix + m for m in ordered[:limit]]


def format_table(summary: dict) -> str:
    cols = headline(summary) + ["train_seconds"]
    width = max(12, *(len(c) for c in cols))
    name_w = max(10, *(len(r["name"]) for r in summary["runs"]))
    lines = [f"{'run':<{name_w}} " + " ".join(f"{c:>{width}}" for c in cols)]
    for r in summary["runs"]:
        lines.append(f"{r['name']:<{name_w}} " + " ".join(
            f"{r['metrics'].get(c, float('nan')):>{width}.4f}" if c != "train_seconds"
            else f"{r['metrics'].get(c, float('nan')):>{width}.1f}" for c in cols))
    lines.append("-" * len(lines[0]))
    stat_rows = [("mean", lambda s: s["mean"]), ("std", lambda s: s["std"]),
                 ("ci95 low", lambda s: s["ci95"][0] if s["ci95"] else None),
                 ("ci95 high", lambda s: s["ci95"][1] if s["ci95"] else None)]
    for label, get in stat_rows:
        cells = []
        for c in cols:
            v = get(summary["metrics"][c]) if c in summary["metrics"] else None
            cells.append(f"{'n/a':>{width}}" if v is None else f"{v:>{width}.{1 if c == 'train_seconds' else 4}f}")
        lines.append(f"{label:<{name_w}} " + " ".join(cells))
    n = summary["num_runs"]
    what = f"{summary['kfold']}-fold cross-validation" if summary["mode"] == "kfold" else f"{n} seeds"
    earlier = summary.get("runs_finished_earlier") or 0
    resumed = f" ({earlier} finished by an earlier invocation; this one took {summary['job_seconds']:.0f} s)" \
        if earlier else ""
    lines.append(f"{what}, {n} runs, {summary['total_seconds']:.0f} s of runs in all{resumed}; "
                 f"{summary['primary_split']} metrics; 95% CI of the mean (t, {n - 1} dof).")
    return "\n".join(lines)


def job_last_lines(summary: dict, output_dir: str) -> list[str]:
    """The block a multi-run job ends with: the main metric's mean and 95% interval over the runs, the time
    (the runs' own, and this invocation's when earlier ones ran some), the folder with its key files."""
    n, what = summary["num_runs"], (f"{summary['kfold']}-fold cross-validation" if summary["mode"] == "kfold"
                                   else f"{summary['num_runs']} seeds")
    names = headline(summary, limit=1)
    stats = summary["metrics"].get(names[0]) if names else None
    if stats and stats.get("mean") is not None:
        spread = (f" ± {stats['ci95_halfwidth']:.4f} (95% CI {stats['ci95'][0]:.4f} to {stats['ci95'][1]:.4f})"
                  if stats.get("ci95") else "")
        head = f"{what}, {names[0].replace('_', ' ', 1)} {stats['mean']:.4f}{spread}, mean of {n} runs"
    else:
        head = f"{what}, {n} runs"
    earlier = summary.get("runs_finished_earlier") or 0
    time_line = f"time   {duration(summary['total_seconds'])} of runs in all"
    if earlier:
        time_line += f"; this invocation {duration(summary['job_seconds'])} ({earlier} runs finished earlier)"
    files = [f for f in (SUMMARY_TXT, SUMMARY, "metrics_summary.png", "learning_curves.png", "confusion_matrix.png")
             if os.path.isfile(os.path.join(output_dir, f))]
    runs = [r["name"] + "/" for r in summary["runs"]]
    folders = ", ".join(runs) if len(runs) <= 3 else f"{runs[0]} ... {runs[-1]}"
    return [f"── done: {head} ──", time_line,
            f"output {output_dir}: {', '.join(files)}; one folder per run: {folders}",
            f"       every run's metrics in {SUMMARY_TXT} and {SUMMARY}"]


def draw_summary_plots(summary: dict, per_run: dict, output_dir: str) -> None:
    histories = {}
    for r in summary["runs"]:
        path = os.path.join(output_dir, r["name"], reporting.LOG_HISTORY)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                histories[r["name"]] = [json.loads(line) for line in fh if line.strip()]
    metric = summary.get("primary_metric") or "loss"
    what = f"{summary['kfold']}-fold CV" if summary["mode"] == "kfold" else f"{summary['num_runs']} seeds"
    finals = {name: ((res.get("train") or {}).get("global_step"), (res.get("eval") or {}).get(metric))
              for name, res in per_run.items()}
    plots.safely(plots.learning_curves_overlay, histories, metric, os.path.join(output_dir, "learning_curves.png"),
                 f"Learning curves, {what}", finals=finals)
    names = headline(summary)
    plots.safely(plots.metric_spread, {r["name"]: r["metrics"] for r in summary["runs"]}, names,
                 os.path.join(output_dir, "metrics_summary.png"),
                 f"{summary['primary_split']} metrics across {what} (box: runs; red: mean ± 95% CI)")
    first = next(iter(per_run.values()))
    labels = (first.get("data") or {}).get("labels")
    split = summary["primary_split"]
    cms = [(per_run[r["name"]].get(split) or {}).get("confusion_matrix") for r in summary["runs"]]
    if labels and cms and all(cm is not None for cm in cms):
        import numpy as np

        total = np.sum(np.asarray(cms), axis=0)
        scope = ("pooled held-out folds" if summary["mode"] == "kfold"
                 else f"{split} set, summed over {summary['num_runs']} runs")
        plots.safely(plots.confusion_matrix, total, labels, os.path.join(output_dir, "confusion_matrix.png"),
                     f"Confusion matrix ({scope})")
