"""The skeleton the three scripts share: settings -> accelerator -> tokenizer -> data -> model ->
train -> best weights -> final evaluation -> outputs. A script fills in the task pieces through a
`TaskSpec`; nothing else differs between them."""
from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from . import checkpoint as ckpt
from . import reporting
from .collate import PadCollator, length_sorted, pad_multiple
from .config import ModelArguments, TrainArguments, parse_args, to_jsonable
from .engine import CKPT_DIR, Engine, Preempted, make_accelerator, reset_accelerate_state, setup_logging, logger
from .errors import EXIT_PREEMPTED, UserError


@dataclass
class Context:
    model_args: ModelArguments
    data_args: Any
    args: TrainArguments
    accelerator: Any
    tokenizer: Any = None
    model_config: Any = None
    timings: dict = field(default_factory=dict)
    split: Any = None       # repeats.SplitPlan of a multi-run job: split seed, k-fold and held-out fold
    run_name: str = ""


@dataclass
class PreparedData:
    train: Any                      # tokenized datasets.Dataset with "length" and "row_id"
    eval: Any = None
    test: Any = None
    raw: dict = field(default_factory=dict)      # split -> raw datasets.Dataset (for predictions files)
    info: dict = field(default_factory=dict)     # goes to results.json["data"]
    identity: dict = field(default_factory=dict)  # checked on resume


class TaskSpec:
    """What a script provides. See train_cls.py for a complete example."""
    description = ""
    data_arguments: type = object
    pipeline_task = ""
    task_name = ""
    supports_kfold = False

    def tokenizer_kwargs(self, ctx: Context) -> dict:
        return {}

    def load_data(self, ctx: Context) -> PreparedData:
        raise NotImplementedError

    def build_model(self, ctx: Context, data: PreparedData):
        raise NotImplementedError

    def make_task(self, ctx: Context, data: PreparedData, model):
        raise NotImplementedError

    def make_collator(self, ctx: Context, data: PreparedData, base: PadCollator):
        return base

    def write_predictions(self, ctx: Context, data: PreparedData, split: str, outputs: dict) -> None:
        pass

    eval_before_training = False  # evaluate the starting weights first (results["eval_before_training"])

    def extra_results(self, ctx: Context, data: PreparedData, results: dict, engine) -> dict:
        return {}

    def after_save(self, ctx: Context, output_dir: str) -> None:
        """Runs on the main process after the model and tokenizer are saved."""

    def model_card(self, ctx: Context, data: PreparedData) -> dict:
        return {"labels": None, "example": "print(pipe('...'))"}


# ---------------------------------------------------------------------------------------------

def load_tokenizer(model_args: ModelArguments, **kwargs):
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=model_args.revision, cache_dir=model_args.cache_dir,
                                            trust_remote_code=model_args.trust_remote_code, **kwargs)
    except Exception as err:
        raise UserError(_model_load_message(name, err, "tokenizer")) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer of '{name}' has no fast (Rust) version; these scripts need one "
                        "(pass --tokenizer_name of a model that has tokenizer.json).")
    return tok


def _model_load_message(name: str, err: Exception, what: str) -> str:
    first = " ".join(str(err).split())[:250]
    if os.path.isdir(name):
        return f"--model '{name}' could not be loaded as a {what}: {first}."
    if os.path.sep in name and not os.path.exists(name) and name.count("/") != 1:
        return f"--model '{name}' does not exist (no such folder, and it is not a Hub id)."
    return (f"--model '{name}' could not be loaded ({what}): it is not a local folder, and the Hub id could not be "
            f"fetched ({first}). Check the path, or the network and the model id.")


def load_config(model_args: ModelArguments):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_args.model, revision=model_args.revision,
                                          cache_dir=model_args.cache_dir, trust_remote_code=model_args.trust_remote_code)
    except Exception as err:
        raise UserError(_model_load_message(model_args.model, err, "config")) from None


def load_pretrained(auto_class, model_args: ModelArguments, **kwargs):
    """from_pretrained with safetensors preferred, a clear error, and the list of newly initialised weights."""
    name = model_args.model
    try:
        model, info = auto_class.from_pretrained(
            name, revision=model_args.revision, cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code, output_loading_info=True,
            # fp32 master weights whatever dtype the checkpoint was stored in (transformers 5 keeps the
            # stored dtype by default, and AdamW on fp16 weights diverges); autocast does mixed precision.
            dtype=torch.float32, **({"attn_implementation": model_args.attn_implementation}
                                    if model_args.attn_implementation else {}), **kwargs)
    except Exception as err:
        raise UserError(_model_load_message(name, err, "model")) from None
    new = sorted(set(info.get("missing_keys", [])) | {k if isinstance(k, str) else k[0]
                                                     for k in info.get("mismatched_keys", [])})
    model._unexpected_keys = sorted(info.get("unexpected_keys", []))
    if new:
        logger.info("newly initialised weights (trained from scratch here): %s", ", ".join(new))
    return model, new


def check_max_length(max_length: int, model_config, flag: str = "--max_length") -> None:
    if max_length <= 2:
        raise UserError(f"{flag} must be greater than 2 (room for [CLS], [SEP] and a token), got {max_length}.")
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise UserError(f"{flag} {max_length} is above the model's limit of {limit} positions; "
                        f"use {flag} {limit} or less.")


def peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024 if platform.system() != "Darwin" else usage / 2**20


def setup_info(accelerator) -> dict:
    dev = accelerator.device
    info = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type.value
                                                                               if hasattr(accelerator.distributed_type, "value")
                                                                               else accelerator.distributed_type),
            "mixed_precision": accelerator.mixed_precision, "precision_reason": getattr(accelerator, "precision_reason", ""),
            "device": str(dev), "num_machines": int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("GROUP_WORLD_SIZE", 1) or 1)),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


def run(spec: TaskSpec, argv: Optional[Sequence[str]] = None) -> dict:
    model_args, data_args, args = parse_args([ModelArguments, spec.data_arguments, TrainArguments], argv,
                                             spec.description)
    reset_accelerate_state()
    repeated = args.is_repeated()
    if repeated and args.resume_from_checkpoint:
        raise UserError("--resume_from_checkpoint is for single runs; a multi-run job (--seeds/--num_runs/--kfold) "
                        "continues by itself when restarted with the same command.")
    if repeated and args.kfold and not spec.supports_kfold:
        raise UserError(f"--kfold is not available for {spec.task_name}; use --seeds for repeated runs.")
    if not repeated:
        reporting.check_output_dir(args.output_dir, args.overwrite_output_dir, args.resume_from_checkpoint)
    accelerator = make_accelerator(args, args.output_dir)
    try:
        if repeated:
            from . import repeats

            return repeats.run_all(spec, model_args, data_args, args, accelerator, _run)
        return _run(spec, Context(model_args, data_args, args, accelerator))
    finally:
        accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        reset_accelerate_state()


def _run(spec: TaskSpec, ctx: Context) -> dict:
    from accelerate.utils import set_seed

    args, accelerator = ctx.args, ctx.accelerator
    setup_logging(accelerator)
    set_seed(args.seed)
    t0 = time.perf_counter()
    ctx.tokenizer = load_tokenizer(ctx.model_args, **spec.tokenizer_kwargs(ctx))
    ctx.model_config = load_config(ctx.model_args)
    if hasattr(ctx.data_args, "max_length"):
        check_max_length(ctx.data_args.max_length, ctx.model_config)
    t_tok = time.perf_counter()
    data = spec.load_data(ctx)
    ctx.timings["load_and_tokenize_seconds"] = time.perf_counter() - t_tok
    if data.eval is None and args.eval_steps is not None:
        raise UserError("--eval_steps was given but there is no evaluation data; pass --validation_file or "
                        "--validation_split > 0.")
    if args.max_eval_samples:
        data.eval = data.eval.select(range(min(args.max_eval_samples, len(data.eval)))) if data.eval is not None else None
        data.test = data.test.select(range(min(args.max_eval_samples, len(data.test)))) if data.test is not None else None
    set_seed(args.seed)
    model = spec.build_model(ctx, data)
    ctx.timings["tokenizer_and_model_seconds"] = time.perf_counter() - t0 - ctx.timings["load_and_tokenize_seconds"]

    ckpt_root = os.path.join(args.output_dir, CKPT_DIR)
    resume = ckpt.resolve_resume(args.resume_from_checkpoint, ckpt_root)
    if args.resume_from_checkpoint == "latest" and resume is None:
        logger.info("no complete checkpoint in %s: starting from scratch", ckpt_root)
    reporting.start_output_dir(args.output_dir, args.overwrite_output_dir, resume is not None,
                               accelerator.is_main_process)
    accelerator.wait_for_everyone()
    settings = to_jsonable(ctx.model_args, ctx.data_args, args)
    if accelerator.is_main_process:
        reporting.save_resolved_config(args.output_dir, settings)
    keep_until = None
    if resume is not None:
        keep_until = ckpt.TrainerState.from_file(os.path.join(resume, ckpt.STATE_FILE)).global_step
    log_writer = reporting.LogWriter(args.output_dir, keep_until) if accelerator.is_main_process else None
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers(spec.task_name, config={k: v for k, v in settings.items()
                                                          if isinstance(v, (int, float, str, bool))})

    multiple = pad_multiple(args, accelerator)
    static = accelerator.distributed_type == "XLA" or args.pad_to_max_length
    fixed = getattr(ctx.data_args, "max_length", None) if static else None
    collator = spec.make_collator(ctx, data, PadCollator(ctx.tokenizer.pad_token_id, multiple, fixed))
    eval_sorted = length_sorted(data.eval) if data.eval is not None and args.eval_strategy != "no" else None
    identity = {"model": ctx.model_args.model, "task": spec.task_name, **data.identity}
    if ctx.split is not None:
        identity["split"] = [ctx.split.seed, ctx.split.kfold, ctx.split.fold]
    task = spec.make_task(ctx, data, model)
    engine = Engine(task, model, args, accelerator, args.output_dir, data.train, eval_sorted, collator,
                    identity, log_fn=log_writer)
    if spec.eval_before_training and engine.eval_dl is not None and resume is None:
        t_initial = time.perf_counter()
        engine.evaluate_initial()
        ctx.timings["initial_eval_seconds"] = time.perf_counter() - t_initial
    try:
        engine.train(resume)
    except Preempted as stop:
        logger.warning("preempted: checkpoint saved to %s; rerun with --resume_from_checkpoint latest", stop)
        raise SystemExit(EXIT_PREEMPTED) from None
    t_train = engine.state.train_seconds
    restored = engine.restore_best()

    # Final evaluation of the weights that get saved, on every evaluation split.
    results: dict = {}
    t_eval = time.perf_counter()
    for split, dataset in (("eval", data.eval), ("test", data.test)):
        if dataset is None:
            continue
        outcome = engine.result_for_final_weights(restored) if split == "eval" and eval_sorted is not None else None
        if outcome is None:
            loader = accelerator.prepare(engine.eval_loader(length_sorted(dataset)))
            outcome = engine.evaluate(loader)
        results[split] = outcome.metrics | {"num_examples": int(len(next(iter(outcome.outputs.values()))))}
        if accelerator.is_main_process:
            spec.write_predictions(ctx, data, split, outcome.outputs)
    eval_seconds = time.perf_counter() - t_eval
    engine.save_model(ctx.tokenizer)
    if accelerator.is_main_process:
        spec.after_save(ctx, args.output_dir)
    accelerator.wait_for_everyone()
    st = engine.state
    # Speeds are over the time spent training: evaluations and checkpoints inside the loop excluded.
    t_steps = t_train - st.eval_seconds - st.checkpoint_seconds
    results["train"] = {
        "global_step": st.global_step, "total_steps": engine.total_steps, "epochs": engine.num_epochs,
        "train_runtime": t_train, "train_samples": len(data.train),
        "train_samples_per_second": st.samples_seen / t_steps if t_steps > 0 else None,
        "train_tokens_per_second": st.tokens_seen / t_steps if t_steps > 0 else None,
        "train_padded_tokens_per_second": st.padded_tokens_seen / t_steps if t_steps > 0 else None,
        "padding_fraction": 1 - st.tokens_seen / st.padded_tokens_seen if st.padded_tokens_seen else None,
        "train_tokens": st.tokens_seen, "train_padded_tokens": st.padded_tokens_seen, "train_samples_seen": st.samples_seen,
        "best_step": st.best_step, "best_metric": st.best_metric, "metric_for_best_model": engine.metric,
        "restored_best": restored, "nonfinite_skipped": st.nonfinite_skipped,
        "final_train_loss": next((r["loss"] for r in reversed(engine.history) if "loss" in r), None),
    }
    results["timing"] = {**ctx.timings, "train_seconds": t_train, "train_steps_seconds": t_steps,
                         "eval_during_training_seconds": st.eval_seconds, "checkpoint_seconds": st.checkpoint_seconds,
                         "first_step_seconds": engine.first_step_seconds, "final_eval_seconds": eval_seconds,
                         "total_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    if args.torch_compile:  # graphs compiled by dynamo: a handful, not one per batch shape
        from torch._dynamo.utils import counters

        results["timing"]["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    if accelerator.device.type == "cuda":
        results["timing"]["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**20
    results["setup"] = setup_info(accelerator) | {
        "optimizer": engine.optimizer_implementation, "torch_compile": args.torch_compile,
        "fast_dropout": bool(engine.fast_dropout), "eval_batch_size": engine.eval_batch_size,
        "pad_to_multiple_of": multiple,
        "loss_items_per_step": engine.items_per_step,  # set: the fixed per-step denominator (token tasks, grouped)
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None)}
    results["data"] = data.info
    results["model"] = {"base_model": ctx.model_args.model, "newly_initialised": getattr(model, "_new_weights", [])}
    if engine.state.initial_eval:
        results["eval_before_training"] = engine.state.initial_eval
    results.update(spec.extra_results(ctx, data, results, engine))
    if accelerator.is_main_process:
        card = spec.model_card(ctx, data)
        reporting.write_model_card(args.output_dir, task=spec.task_name, base_model=ctx.model_args.model,
                                   data=data.info.get("source", "local files"), results=results,
                                   labels=card.get("labels"), pipeline_task=spec.pipeline_task,
                                   example=card["example"])
        draw_run_plots(args.output_dir, engine.metric, results, ctx.run_name)
        reporting.write_json(os.path.join(args.output_dir, reporting.RESULTS), results)  # last: marks the run done
    engine.cleanup_best()
    summary = " ".join(f"{split}_{k}={v:.4f}" for split in ("eval", "test") for k, v in results.get(split, {}).items()
                       if isinstance(v, float))
    logger.info("done in %.1f s (train %.1f s): %s", results["timing"]["total_seconds"], t_train, summary)
    return results


def draw_run_plots(output_dir: str, metric: str, results: dict, name: str = "") -> None:
    """learning_curve.png from log_history.jsonl, and confusion_matrix.png when there is one."""
    import json

    from . import plots

    path = os.path.join(output_dir, reporting.LOG_HISTORY)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            history = [json.loads(line) for line in fh if line.strip()]
        plots.safely(plots.learning_curve, history, metric, os.path.join(output_dir, "learning_curve.png"),
                     f"Learning curve{f' ({name})' if name else ''}")
    labels = (results.get("data") or {}).get("labels")
    split = "test" if (results.get("test") or {}).get("confusion_matrix") else "eval"
    cm = (results.get(split) or {}).get("confusion_matrix")
    if labels and cm:
        where = "held-out fold" if split == "test" and "fold" in name else f"{split} set"
        plots.safely(plots.confusion_matrix, cm, labels, os.path.join(output_dir, "confusion_matrix.png"),
                     f"Confusion matrix, {where}{f' ({name})' if name else ''}")
