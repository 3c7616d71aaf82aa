"""One run, in the order things happen: tokenizer and config -> data -> model -> objective and
collator (`prepare_run`, also used by bench/run.py) -> output folder -> training objects -> train
-> best weights -> final evaluation of every evaluation split -> saved model -> results.json.

A multi-run job (repeats.py) calls `run_single` once per planned run, each in its own folder.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .. import hub, progress
from ..config import parse_layers, to_jsonable
from ..data import validate
from ..data.collate import PadCollator, graph_buckets, length_sorted, pad_multiple
from ..errors import EXIT_PREEMPTED, UserError
from ..log import logger
from ..shipping import onnx_predict
from ..task import BuiltModel, Context, Objective, PreparedData, Task, write_predictions
from ..training import capture, distill
from ..training import checkpoint as ckpt
from ..training.build import build_training, check_fsdp_model, eval_batch_size, eval_loader, planned_optimizer
from ..training.evaluation import evaluate
from ..training.loop import CKPT_DIR, Preempted, Trainer
from ..training.models import check_max_length, keep_layers, load_config, load_tokenizer
from ..training.runtime import compile_counters, compile_report, peak_rss_mb, setup_info
from . import plots, reporting
from .predictions import stream_predictions


@dataclass
class RunInputs:
    data: PreparedData
    built: BuiltModel
    objective: Objective
    collator: PadCollator
    pad_multiple: int | None
    buckets: list | None = None  # --cuda_graphs: the padded lengths (collate.graph_buckets)


def prepare_run(task: Task, ctx: Context) -> RunInputs:
    """Tokenizer, config, data, model, objective and collator of a run (no file written yet)."""
    from accelerate.utils import set_seed

    args = ctx.args
    # An ONNX folder of export.py is scored by ONNX Runtime; what it cannot do is refused before any loading.
    onnx = onnx_predict.check(task, ctx)
    # First, before any loading: `latest` without a checkpoint is refused; what is resumed decides what is logged.
    ctx.resume_from = resume_point(args) if args.do_train else None
    set_seed(args.seed)
    t0 = time.perf_counter()
    ctx.tokenizer = load_tokenizer(ctx.model_args, **task.tokenizer_kwargs(ctx.model_args))
    ctx.model_config = load_config(ctx.model_args)
    archs = getattr(ctx.model_config, "architectures", None) or []
    if not args.do_train and task.head and not any(a.endswith(task.head) for a in archs):
        raise UserError(f"--model '{ctx.model_args.model}' is a {', '.join(archs) or 'bare'} checkpoint, not a trained "
                        f"*{task.head} model: --no_do_train needs a model fine-tuned for this task (e.g. an output "
                        "folder of this script), or drop --no_do_train to train it.")
    check_max_length(ctx.data_args.max_length, ctx.model_config)
    t_data = time.perf_counter()
    data = task.load_data(ctx)
    ctx.timings["load_and_tokenize_seconds"] = time.perf_counter() - t_data
    data.eval = data.eval if args.do_eval else None
    data.test = data.test if args.do_predict else None
    if not args.do_train and data.eval is None and data.test is None:
        raise UserError("--no_do_train with nothing to do: pass --validation_file (with --do_eval) or --test_file "
                        "(with --do_predict).")
    if data.eval is None and args.eval_steps is not None:
        raise UserError("--eval_steps was given but there is no evaluation data; pass --validation_file or "
                        "--validation_split > 0.")
    if data.eval is None and args.early_stopping_patience is not None and args.do_train:
        raise UserError("--early_stopping_patience counts evaluations, but there is no evaluation data; pass "
                        "--validation_file or --validation_split > 0, or drop --early_stopping_patience.")
    if args.max_eval_samples:
        cap = args.max_eval_samples
        data.eval = data.eval.select(range(min(cap, len(data.eval)))) if data.eval is not None else None
        data.test = data.test.select(range(min(cap, len(data.test)))) if data.test is not None else None
    set_seed(args.seed)  # the new head's initialisation does not depend on how much data loading drew
    with progress.phase(f"loading the model {ctx.model_args.model}"):  # a download, when not cached yet
        built = onnx_predict.load(ctx, onnx) if onnx else task.build_model(ctx, data)
    new = built.untrained
    if new and args.do_train and ctx.resume_from is None:  # resuming: every weight comes from the checkpoint
        logger.info("newly initialised weights (trained from scratch here): %s", ", ".join(new))
    if args.init_student_layers:  # a smaller student: a subset of --model's layers (DistilBERT-style)
        keep_layers(built.model, parse_layers(args.init_student_layers, "--init_student_layers"), ctx.model_args.model)
    if onnx is None:
        check_fsdp_model(built.model, ctx.accelerator)
    ctx.timings["tokenizer_and_model_seconds"] = time.perf_counter() - t0 - ctx.timings["load_and_tokenize_seconds"]
    multiple = pad_multiple(args, ctx.accelerator)
    static = ctx.accelerator.distributed_type == "XLA" or args.pad_to_max_length
    # Steps that may be captured as CUDA graphs: lengths padded to a few buckets (a graph each)
    buckets = graph_buckets() if onnx is None and capture.static_reason(args, ctx.accelerator, planned_optimizer(
        args, ctx.accelerator.device)) is None else None
    base = PadCollator(ctx.tokenizer.pad_token_id, multiple, ctx.data_args.max_length if static else None,
                       buckets=buckets)
    objective = task.objective(ctx, data, built)
    if args.metric_for_best_model:
        validate.check_metric(args.metric_for_best_model, objective.metric_names, task.name)
        if args.do_train and (data.eval is None or args.eval_strategy == "no"):
            logger.warning("--metric_for_best_model %s has no effect: nothing is evaluated during training",
                           args.metric_for_best_model)
    collator = task.collator(ctx, data, base)
    if args.teacher_model:  # the task's objective, wrapped: the teacher checked and its logits cached, or loaded
        objective = distill.setup(task, ctx, data, built, objective, collator)
    ctx.timings["prepare_seconds"] = time.perf_counter() - t0
    return RunInputs(data, built, objective, collator, multiple, buckets)


def resume_point(args) -> str | None:
    """The checkpoint folder --resume_from_checkpoint names (checkpoint.resolve_resume), or None for a fresh start."""
    root = os.path.join(args.output_dir, CKPT_DIR)
    found = ckpt.resolve_resume(args.resume_from_checkpoint, root)
    if args.resume_from_checkpoint == "auto" and found is None:
        logger.info("--resume_from_checkpoint auto: no checkpoint in %s yet, starting from scratch", root)
    return found


def run_single(task: Task, ctx: Context, inputs: RunInputs | None = None) -> dict:
    """Train one model into ctx.args.output_dir; returns its results (also in results.json). `inputs`: this run's
    prepare_run, when the caller already made it (repeats.py checks the first run before writing anything)."""
    args, accelerator = ctx.args, ctx.accelerator
    # A run prepared by the caller (repeats.py) counts its preparation too: the time split adds up to the total.
    started = time.perf_counter() - (ctx.timings.get("prepare_seconds", 0.0) if inputs is not None else 0.0)
    inputs = inputs or prepare_run(task, ctx)
    data = inputs.data
    compiled_before = compile_counters() if args.torch_compile else None  # this run's share is reported
    # the time split (stamp_time): the command's start-up and launch when launch measured them, then this run's
    launched = {name: ctx.timings[f"{name}_seconds"] for name in ("startup", "launch")
                if ctx.timings.get(f"{name}_seconds") is not None}
    if not args.do_train:
        return evaluate_only(task, ctx, inputs, reporting.TimeSplit(launched, started, ("load", "eval", "save")))
    clock = reporting.TimeSplit(launched, started, ("load", "train", "eval", "checkpoints", "save"))

    resume = ctx.resume_from
    eval_sorted = length_sorted(data.eval) if data.eval is not None and args.eval_strategy != "no" else None
    identity = {"model": ctx.model_args.model, "task": task.name, **data.identity}
    if ctx.split is not None:
        identity["split"] = [ctx.split.seed, ctx.split.kfold, ctx.split.fold]
    training = build_training(inputs.objective, inputs.built.model, args, accelerator, data.train, eval_sorted,
                              inputs.collator, inputs.buckets)
    trainer = Trainer(inputs.objective, training, args, ctx.runtime, args.output_dir, identity)
    trainer.on_evaluate = ctx.on_evaluate
    checked = trainer.check_checkpoint(resume) if resume is not None else None

    # Output folder: created (or cleared) only now that data, model, training objects and checkpoint checked out.
    reporting.start_output_dir(args.output_dir, args.overwrite_output_dir, resume is not None,
                               accelerator.is_main_process)
    accelerator.wait_for_everyone()
    settings = to_jsonable(ctx.model_args, ctx.data_args, args)
    if accelerator.is_main_process:
        reporting.save_resolved_config(args.output_dir, settings)
    if accelerator.is_main_process:  # a resumed log starts with the checkpoint's records (steps after it rerun)
        trainer.log_fn = reporting.LogWriter(args.output_dir, checked.history if checked else None)
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers(task.name, config={k: v for k, v in settings.items()
                                                     if isinstance(v, (int, float, str, bool))})
    clock.lap("load")
    if task.eval_before_training and training.eval_dl is not None and resume is None:
        with progress.phase("evaluating the starting weights", f"{len(eval_sorted):,} examples") as initial:
            trainer.evaluate_initial()
        ctx.timings["initial_eval_seconds"] = initial.seconds
        clock.lap("eval")
    try:
        trainer.train(checked)
    except Preempted as stop:
        logger.warning("preempted: checkpoint saved to %s; rerun with --resume_from_checkpoint latest", stop)
        raise SystemExit(EXIT_PREEMPTED) from None
    train_call = clock.lap("train")  # the whole train() call: the checkpoint load included
    # this session's evaluations and checkpoints inside the loop (the trainer state counts earlier sessions too)
    before = trainer.resumed.state if trainer.resumed else None
    clock.move(trainer.state.eval_seconds - (before.eval_seconds if before else 0.0), "train", "eval")
    clock.move(trainer.state.checkpoint_seconds - (before.checkpoint_seconds if before else 0.0), "train",
               "checkpoints")
    logger.info("training: done in %s (%s)", progress.duration(train_call),
                steps_done(trainer.state.global_step, checked.state.global_step if checked else None,
                           trainer.state.train_seconds))
    restored = trainer.restore_best()

    t_eval = time.perf_counter()
    results = final_evaluation(task, ctx, data, trainer, restored, reuse_eval=eval_sorted is not None)
    eval_seconds = time.perf_counter() - t_eval
    clock.lap("eval")  # restoring the best weights, the final evaluation and its predictions files
    trainer.save_model(ctx.tokenizer)
    saved_extra = task.after_save(ctx, data, inputs.built, args.output_dir) if accelerator.is_main_process else {}
    accelerator.wait_for_everyone()
    results.update(run_results(ctx, data, inputs, trainer, restored, eval_seconds, compiled_before))
    if checked is not None:
        results["timing"]["resumed_at_step"] = checked.state.global_step
    results.update(task.extra_results(ctx, data, inputs.built, results, trainer))
    for key, value in saved_extra.items():  # sections are merged: after_save adds to what extra_results gave
        results[key] = {**results.get(key, {}), **value} if isinstance(value, dict) else value
    if accelerator.is_main_process:
        for name, text in inputs.objective.output_files().items():  # distillation: augment_samples.txt
            reporting.write_text_atomic(os.path.join(args.output_dir, name), text)
        write_outputs(task, ctx, data, results, trainer.metric, clock)
    else:
        stamp_time(results, clock)
    trainer.cleanup_best()
    clock.lap("save")  # the closing block's split goes on: the best weights' checkpoint removed, the upload
    if ctx.hub_repo and accelerator.is_main_process:
        logger.info("uploaded %s to %s", args.output_dir, hub.push(args, ctx.hub_repo))
    accelerator.wait_for_everyone()
    if ctx.hub_repo:
        clock.lap("upload")
    if accelerator.is_main_process:
        logger.info("\n".join(last_lines(results, trainer.metric, args.output_dir, key_files(args.output_dir),
                                         clock.parts)))
    return results


def evaluate_only(task: Task, ctx: Context, inputs: RunInputs, clock: reporting.TimeSplit) -> dict:
    """--no_do_train: evaluate and/or predict with the model as it is. Labelled splits are evaluated exactly as
    at the end of training (same order, batches and metrics); unlabelled ones are predicted in file order and
    streamed to the predictions file."""
    args, acc, data = ctx.args, ctx.accelerator, inputs.data
    new = inputs.built.untrained
    if new:
        raise UserError(f"--model '{ctx.model_args.model}' has no trained weights for {', '.join(new[:4])}"
                        f"{' ...' if len(new) > 4 else ''}: --no_do_train needs a model fine-tuned for this task (e.g. "
                        "an output folder of this script), or drop --no_do_train to train it.")
    reporting.start_output_dir(args.output_dir, args.overwrite_output_dir, False, acc.is_main_process)
    acc.wait_for_everyone()
    if acc.is_main_process:
        reporting.save_resolved_config(args.output_dir, to_jsonable(ctx.model_args, ctx.data_args, args))
    ort = isinstance(inputs.built.model, onnx_predict.OnnxModel)  # ONNX Runtime, one process (onnx_predict.py)
    model = inputs.built.model if ort else acc.prepare(inputs.built.model)
    batch_size = eval_batch_size(args, torch.device("cpu") if ort else acc.device)  # ONNX Runtime runs on the CPU
    results: dict = {}
    clock.lap("load")
    for split, dataset in (("eval", data.eval), ("test", data.test)):
        if dataset is None:
            continue
        started = time.perf_counter()
        if "labels" in dataset.column_names:  # evaluated as after training: length-sorted, all outputs kept
            with progress.phase(f"evaluating on {split}", f"{len(dataset):,} examples"):
                outcome = (onnx_predict.evaluate(model, inputs.objective, dataset, batch_size, inputs.collator, args,
                                                 split) if ort else
                           evaluate(model, inputs.objective, acc.prepare(eval_loader(
                               length_sorted(dataset), batch_size, inputs.collator, args)), acc, split))
            results[split] = outcome.metrics | {"num_examples": outcome.num_examples}
            if acc.is_main_process:
                write_predictions(task, ctx, data, split, outcome.outputs)
        else:  # predicted in file order, each gathered batch written as it comes
            writer = task.prediction_writer(ctx, data, split) if acc.is_main_process else None
            try:
                with progress.phase(f"predicting {split}", f"{len(dataset):,} rows, no labels"):
                    rows = (onnx_predict.stream_predictions(model, inputs.objective, dataset, batch_size,
                                                            inputs.collator, args, writer) if ort else
                            stream_predictions(model, inputs.objective, acc.prepare(eval_loader(
                                dataset, batch_size, inputs.collator, args)), acc, writer))
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            if writer is not None:
                writer.close()
            results[split] = {"num_examples": rows}
        seconds = time.perf_counter() - started
        results[split]["predictions_per_second"] = results[split]["num_examples"] / seconds if seconds > 0 else None
    clock.lap("eval")
    timing = {**ctx.timings, "peak_rss_mb": peak_rss_mb()}
    results.update(timing=timing, data=data.info, model={"base_model": ctx.model_args.model, "trained_here": False,
                                                         **({"onnx": model.info} if ort else {})},
                   setup=setup_info(ctx.runtime) | {"eval_batch_size": batch_size,
                                                    "pad_to_multiple_of": inputs.pad_multiple})
    if acc.is_main_process:
        draw_run_plots(args.output_dir, inputs.objective.default_metric, results, ctx.run_name)
    stamp_time(results, clock)
    if acc.is_main_process:
        reporting.write_json(os.path.join(args.output_dir, reporting.RESULTS), results)
    acc.wait_for_everyone()
    clock.lap("save")
    if acc.is_main_process:
        logger.info("\n".join(last_lines(results, args.metric_for_best_model or inputs.objective.default_metric,
                                         args.output_dir, key_files(args.output_dir), clock.parts)))
    return results


def final_evaluation(task: Task, ctx: Context, data: PreparedData, trainer: Trainer, restored: bool,
                     reuse_eval: bool) -> dict:
    """Metrics of the weights that get saved on every evaluation split (reusing an evaluation already
    made of exactly these weights); predictions files written on the main process."""
    results: dict = {}
    for split, dataset in (("eval", data.eval), ("test", data.test)):
        if dataset is None:
            continue
        outcome = trainer.result_for_final_weights(restored) if split == "eval" and reuse_eval else None
        if outcome is None:
            loader = eval_loader(length_sorted(dataset), trainer.training.eval_batch_size, trainer.training.collator,
                                 ctx.args)
            with progress.phase(f"final evaluation on {split}", f"{len(dataset):,} examples"):
                outcome = trainer.evaluate(ctx.accelerator.prepare(loader), split)
        else:
            logger.info("final evaluation on %s: the saved weights were evaluated at step %d; reused", split,
                        trainer.state.best_step if restored else trainer.state.global_step)
        results[split] = outcome.metrics | {"num_examples": outcome.num_examples}
        if ctx.accelerator.is_main_process:
            write_predictions(task, ctx, data, split, outcome.outputs)
    return results


def run_results(ctx: Context, data: PreparedData, inputs: RunInputs, trainer: Trainer, restored: bool,
                eval_seconds: float, compiled_before: dict | None = None) -> dict:
    """results.json's train, timing (less its total and parts: stamp_time), setup, data and model sections."""
    args, st, t = ctx.args, trainer.state, trainer.training
    # Speeds are over the time spent training: evaluations and checkpoints inside the loop excluded.
    t_steps = st.train_seconds - st.eval_seconds - st.checkpoint_seconds

    def per_second(n):
        return n / t_steps if t_steps > 0 else None

    train = {
        "global_step": st.global_step, "total_steps": t.total_steps, "epochs": t.num_epochs,
        "train_runtime": st.train_seconds, "train_samples": len(data.train),
        "train_samples_per_second": per_second(st.samples_seen),
        "train_tokens_per_second": per_second(st.tokens_seen),
        "train_padded_tokens_per_second": per_second(st.padded_tokens_seen),
        "padding_fraction": 1 - st.tokens_seen / st.padded_tokens_seen if st.padded_tokens_seen else None,
        "train_tokens": st.tokens_seen, "train_padded_tokens": st.padded_tokens_seen,
        "train_samples_seen": st.samples_seen,
        "best_step": st.best_step, "best_metric": st.best_metric, "metric_for_best_model": trainer.metric,
        "restored_best": restored,
        "nonfinite_skipped": st.nonfinite_skipped,
        "final_train_loss": next((r["loss"] for r in reversed(trainer.history) if "loss" in r), None),
        # a resumed run: where this session started; train_runtime and the speeds count every session
        "resumed_from": ({"checkpoint": trainer.resumed.path, "step": trainer.resumed.state.global_step,
                          "train_seconds": trainer.resumed.state.train_seconds} if trainer.resumed else None),
    }
    # train_seconds and the speeds cover every session of a resumed run; session_train_seconds and
    # total_seconds only this process's (so a resumed run's training time may exceed its total).
    timing = {**ctx.timings, "train_seconds": st.train_seconds, "session_train_seconds": trainer.session_train_seconds,
              "train_steps_seconds": t_steps,
              "eval_during_training_seconds": st.eval_seconds, "checkpoint_seconds": st.checkpoint_seconds,
              "first_step_seconds": trainer.first_step_seconds, "final_eval_seconds": eval_seconds,
              "peak_rss_mb": peak_rss_mb()}
    if ctx.accelerator.num_processes > 1:  # collective: every process's peak (sharding shows here)
        rss = ctx.accelerator.gather(torch.tensor([timing["peak_rss_mb"]], device=ctx.accelerator.device))
        timing["peak_rss_mb_per_process"] = [round(float(x), 1) for x in rss.tolist()]
    timing["capture_seconds"] = trainer.graph_stats.capture_seconds  # recording CUDA graphs (in train_steps_seconds)
    if compiled_before is not None:  # graphs compiled by dynamo (a handful, not one per batch shape), the seconds
        compiled = compile_report(compiled_before)  # it took and the caches that spared it (this run's share)
        timing["compiled_graphs"] = compiled.pop("compiled_graphs")
        timing["compile_seconds"] = compiled.pop("compile_seconds")
    if ctx.accelerator.device.type == "cuda":
        timing["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(ctx.accelerator.device) / 2**20
    model = inputs.built.model
    setup = setup_info(ctx.runtime) | {
        "optimizer": t.optimizer_implementation, "torch_compile": args.torch_compile,
        "fast_dropout": bool(t.fast_dropout), "eval_batch_size": t.eval_batch_size,
        "pad_to_multiple_of": inputs.pad_multiple, "cuda_graphs": trainer.graph_stats.as_dict(),
        "loss_items_per_step": t.items_per_step,  # set: the fixed per-step denominator (token tasks, grouped)
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None)}
    if t.sharding:
        setup["fsdp"] = t.sharding
    if compiled_before is not None:
        setup["compile_cache"] = compiled
    out = {"train": train, "timing": timing, "setup": setup, "data": data.info,
           "model": {"base_model": ctx.model_args.model, "newly_initialised": inputs.built.new_weights}}
    if args.init_student_layers:
        out["model"]["student_from_layers"] = parse_layers(args.init_student_layers, "--init_student_layers")
    out.update(inputs.objective.report())  # distillation: the teacher and the settings
    if st.initial_eval:
        out["eval_before_training"] = st.initial_eval
    return out


def write_outputs(task: Task, ctx: Context, data: PreparedData, results: dict, metric: str,
                  clock: reporting.TimeSplit | None = None) -> None:
    """Model card, plots and results.json (last: its presence marks the run as finished; its time split stamped
    just before, when `clock` is given). Main process."""
    output_dir = ctx.args.output_dir
    card = task.model_card(ctx, data)
    reporting.write_model_card(output_dir, task=task.name, base_model=ctx.model_args.model,
                               data=data.info.get("source", "local files"), results=results,
                               labels=card.get("labels"), pipeline_task=task.pipeline_task, example=card["example"],
                               distillation=results.get("distillation"),
                               student_from_layers=results["model"].get("student_from_layers"))
    draw_run_plots(output_dir, metric, results, ctx.run_name)
    if clock is not None:
        stamp_time(results, clock)
    reporting.write_json(os.path.join(output_dir, reporting.RESULTS), results)


def stamp_time(results: dict, clock: reporting.TimeSplit) -> None:
    """results.json's time split: every second of `total_seconds` in one of `parts` (startup: process start to
    launch, when this process was started for the command; launch: settings and runtime; load: tokenizer, data,
    model, training objects, output folder; train: the loop less its evaluations and checkpoints; eval; checkpoints;
    save: the model, the card, the plots, up to this file). The save part runs until now."""
    clock.lap("save")
    results["timing"]["parts"] = dict(clock.parts)
    results["timing"]["total_seconds"] = clock.total


def draw_run_plots(output_dir: str, metric: str, results: dict, name: str = "") -> None:
    """learning_curve.png from log_history.jsonl (with the final evaluation and the restored best step), and
    confusion_matrix.png when there is one."""
    import json

    path = os.path.join(output_dir, reporting.LOG_HISTORY)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            history = [json.loads(line) for line in fh if line.strip()]
        train = results.get("train") or {}
        final = (train.get("global_step"), (results.get("eval") or {}).get(metric)) if "eval" in results else None
        plots.safely(plots.learning_curve, history, metric, os.path.join(output_dir, "learning_curve.png"),
                     f"Learning curve{f' ({name})' if name else ''}", final=final,
                     restored_step=train.get("best_step") if train.get("restored_best") else None)
    labels = (results.get("data") or {}).get("labels")
    split = "test" if (results.get("test") or {}).get("confusion_matrix") else "eval"
    cm = (results.get(split) or {}).get("confusion_matrix")
    if labels and cm:
        where = "held-out fold" if split == "test" and "fold" in name else f"{split} set"
        plots.safely(plots.confusion_matrix, cm, labels, os.path.join(output_dir, "confusion_matrix.png"),
                     f"Confusion matrix, {where}{f' ({name})' if name else ''}")


# ---------------------------------------------------------------------------------------------
# The last lines of a run
# ---------------------------------------------------------------------------------------------

# What a user opens first, in this order; predictions files and plots are found by their names.
KEY_FILES = ("model.safetensors", "results.json", "predictions_*", "learning_curve.png", "confusion_matrix.png",
             "README.md")


def key_files(output_dir: str) -> list[str]:
    """The key files present in output_dir (not the tokenizer and config files), and checkpoints/ if kept."""
    import glob

    found = []
    for pattern in KEY_FILES:
        found += sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(output_dir), pattern))
                        if os.path.isfile(p))
    if os.path.isdir(os.path.join(output_dir, CKPT_DIR)):
        found.append(CKPT_DIR + "/")
    return found


def steps_done(global_step: int, resumed_at: int | None, train_seconds: float) -> str:
    """'115 steps', or for a resumed run 'steps 58-115 in this session; 55.0 s of training over all sessions'."""
    if resumed_at is None:
        return f"{global_step} steps"
    return (f"steps {resumed_at + 1}-{global_step} in this session; {progress.duration(train_seconds)} of training "
            "over all sessions")


def _split_text(split: str, values: dict, metric: str) -> str:
    """'eval accuracy 0.8333 on 408 examples', or 'test: 37 rows predicted (no labels)'."""
    value = values.get(metric)
    n = values.get("num_examples", 0)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{split} {metric} {value:.4f} on {n:,} examples"
    return f"{split}: {n:,} rows predicted (no labels)"


def last_lines(results: dict, metric: str, output_dir: str, files: list[str], parts: dict) -> list[str]:
    """The block a run ends with: the main metric and the best step, the other split, the time split of this
    session (its parts add up to the total; a resumed run's training over all sessions named as such), and
    the output folder with its key files. `parts`: name -> seconds of this session."""
    train, timing = results.get("train"), results.get("timing") or {}
    splits = [s for s in ("eval", "test") if s in results]
    if train is None:
        where = "the model as it is, not trained"
    elif train.get("restored_best") and train.get("best_step") is not None:
        where = f"best at step {train['best_step']} of {train['global_step']}, restored"
    elif train.get("best_step") is not None:
        where = f"the last step's weights, step {train['global_step']}; best evaluated at step {train['best_step']}"
    else:
        where = f"the last step's weights, step {train['global_step']}"
    if splits:
        head = _split_text(splits[0], results[splits[0]], metric)
    elif train and train.get("final_train_loss") is not None:
        head = f"final training loss {train['final_train_loss']:.4f}, no evaluation data"
    else:
        head = "nothing evaluated"
    lines = [f"── done: {head} ({where}) ──"]
    lines += [" " * 7 + _split_text(split, results[split], metric) for split in splits[1:]]
    note = "this session" if train else ""
    if timing.get("resumed_at_step") is not None:
        note += (f", resumed at step {timing['resumed_at_step']}; {progress.duration(timing['train_seconds'])} of "
                 "training over all sessions")
    shown = " + ".join(f"{name} {progress.duration(seconds)}" for name, seconds in parts.items()
                       if seconds >= 0.05 or name == "train")
    lines.append(f"time   total {progress.duration(sum(parts.values()))} = {shown}" + (f" ({note})" if note else ""))
    lines.append(f"output {output_dir}: {', '.join(files) if files else '(nothing written)'}")
    lines.append(" " * 7 + f"every metric and timing in {reporting.RESULTS}"
                 + (f", the loss per step in {reporting.LOG_HISTORY}" if train else ""))
    return lines
