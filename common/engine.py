"""THE training loop, shared by the three scripts.

A script supplies a `Task` (how to compute a batch's summed loss, count its items, and turn
gathered eval outputs into metrics); everything else lives here once: the Accelerator and its
precision, AdamW and the schedule in optimizer steps, gradient accumulation with an exact
item-normalised loss, clipping, logging, evaluation through `gather_for_metrics`, best model and
early stopping, checkpoints and exact mid-epoch resume, preemption and non-finite losses.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import checkpoint as ckpt
from .collate import LengthGroupedSampler, PadCollator, SeededRandomSampler
from .config import TrainArguments
from .errors import UserError
from .metrics import greater_is_better

logger = logging.getLogger("bert_finetune")

CKPT_DIR = "checkpoints"
BEST = "best"


# ---------------------------------------------------------------------------------------------
# Runtime: processes, device, precision
# ---------------------------------------------------------------------------------------------

def _accelerator_device_available() -> bool:
    """Any device accelerate would place a process on, without initialising CUDA."""
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "mlu", "musa", "hpu"):
        mod = getattr(torch, name, None)
        if mod is not None and hasattr(mod, "is_available"):
            try:
                if mod.is_available():
                    return True
            except Exception:  # pragma: no cover - exotic backends
                pass
    from accelerate.utils import is_torch_xla_available

    return bool(os.environ.get("ACCELERATE_USE_XLA") or os.environ.get("XRT_TPU_CONFIG")) and is_torch_xla_available()


def cpu_bf16_is_fast() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def resolve_precision(requested: Optional[str], device: torch.device) -> tuple[str, str]:
    """(mixed_precision, why). Unset -> the accelerate launcher's setting if any, else 'auto'."""
    why = "--mixed_precision"
    if requested is None:
        env = os.environ.get("ACCELERATE_MIXED_PRECISION")
        requested, why = (env, "accelerate launch config") if env else ("auto", "auto")
    requested = requested.lower()
    kind = device.type
    if requested == "auto":
        if kind == "cuda":
            return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), "auto: CUDA"
        if kind == "xla":
            return "bf16", "auto: XLA"
        if kind == "cpu" and cpu_bf16_is_fast():
            return "bf16", "auto: CPU with AVX512-BF16/AMX"
        return "no", f"auto: {kind} without fast bf16"
    if requested == "fp16" and kind == "cpu":
        raise UserError("--mixed_precision fp16 is not supported on CPU; use bf16 (fast only on CPUs with "
                        "AVX512-BF16/AMX) or no.")
    if requested == "fp16" and kind == "mps" and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        raise UserError("--mixed_precision fp16 on Apple MPS needs torch >= 2.5; upgrade torch or use no.")
    if requested == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--mixed_precision bf16 is not supported by this GPU; use fp16 or no.")
    if requested == "bf16" and kind == "cpu" and not cpu_bf16_is_fast():
        logger.warning("bf16 requested on a CPU without AVX512-BF16/AMX: it will run much slower than fp32.")
    return requested, why


def make_accelerator(args: TrainArguments, project_dir: str):
    """Create the Accelerator, making sure a multi-process launch really gets several ranks."""
    from datetime import timedelta

    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if world > 1 and not use_cpu and not _accelerator_device_available():
        # accelerate sets up gloo only for cpu=True; otherwise each rank would train alone.
        use_cpu = True
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))
    try:
        state = PartialState(cpu=use_cpu, timeout=timedelta(seconds=args.ddp_timeout))
    except Exception as err:  # rendezvous timed out or was refused
        if world <= 1:
            raise
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise UserError(f"this process (RANK={os.environ.get('RANK', '?')}) could not join the {world}-process group at "
                        f"{where} within --ddp_timeout {args.ddp_timeout} s ({type(err).__name__}); start every rank "
                        "with `accelerate launch` (or torchrun) and check --main_process_ip/--main_process_port.") from None
    if world > 1 and state.num_processes == 1:
        raise UserError(f"the launcher started {world} processes (WORLD_SIZE={world}) but they did not join one "
                        "process group; set ACCELERATE_USE_CPU=1 or fix the accelerate config.")
    precision, why = resolve_precision(args.mixed_precision, state.device)
    if state.device.type == "cuda" and os.environ.get("BERT_FINETUNE_CUDNN_SDPA", "0") != "1":
        # cuDNN's attention builds a new graph for every new sequence length; with dynamic padding
        # that made bf16 training several times slower than fp32 on an H100. Flash/efficient SDPA don't.
        torch.backends.cuda.enable_cudnn_sdp(False)
    log_with = None if args.report_to in ("none", "", None) else (
        "all" if args.report_to == "all" else [t.strip() for t in args.report_to.split(",") if t.strip()])
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=project_dir,
        rng_types=[],  # we reseed per micro-step from (seed, step); nothing to synchronise
        kwargs_handlers=[timeout],
        # Dynamic shapes from the first step: batches come in a few padded lengths (and a short last
        # batch), and a static first graph would be compiled, thrown away and compiled again as dynamic
        # at the second length (measured: 22 s + 28 s on an H100 for MiniLM; now one compile).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", dynamic=True) if args.torch_compile else None,
    )
    accelerator.precision_reason = why
    return accelerator


def reset_accelerate_state() -> None:
    """Allow another run in the same Python process (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def setup_logging(accelerator) -> None:
    level = logging.INFO if accelerator.is_local_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=level,
                        stream=sys.stderr, force=True)
    logger.setLevel(level)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    if not (accelerator.is_local_main_process and sys.stderr.isatty()):
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        try:
            import huggingface_hub.utils as hub_utils

            hub_utils.disable_progress_bars()
        except Exception:  # pragma: no cover
            pass


# ---------------------------------------------------------------------------------------------
# The task interface
# ---------------------------------------------------------------------------------------------

class Task(Protocol):
    default_metric: str
    eval_pad_values: dict  # eval output key -> pad value for per-token outputs (padded across processes)

    def count_items(self, batch: dict) -> torch.Tensor: ...          # what the loss is averaged over
    # Optional: total_items(train_dataset) -> float | None, the items of one epoch (token tasks). With
    # length-grouped batches the engine then divides by the epoch's mean per optimizer step instead
    # of each step's own count (see Engine.items_per_step).
    def loss_sum(self, model, batch: dict) -> torch.Tensor: ...       # summed (not averaged) loss
    def eval_outputs(self, model, batch: dict) -> dict: ...           # tensors with the batch as dim 0
    def compute_metrics(self, outputs: dict) -> dict: ...             # outputs: key -> np.ndarray


def model_inputs(batch: dict, keys=("input_ids", "attention_mask", "token_type_ids")) -> dict:
    return {k: batch[k] for k in keys if k in batch}


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------

# Devices where auto picks fused AdamW (PyTorch has it for CUDA, XPU, MPS and, since 2.4, CPU). On the
# 2-core CPU here the fused step of a MiniLM-sized model takes 14 ms against 63 ms for foreach.
FUSED_ADAMW_DEVICES = ("cuda", "xpu", "mps", "cpu")


def build_optimizer(model, args: TrainArguments, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias")
         else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    choice = args.optim
    if choice == "auto":
        choice = "adamw_torch_fused" if device.type in FUSED_ADAMW_DEVICES else "adamw_torch_foreach"
    if choice == "adamw_torch_fused":
        kw["fused"] = True  # one kernel for all parameters
    elif choice == "adamw_torch_foreach":
        kw["foreach"] = True
    try:
        optimizer = torch.optim.AdamW(groups, **kw)
    except (RuntimeError, TypeError) as err:  # fused not available for this device/dtype
        if args.optim != "auto":
            raise UserError(f"--optim {args.optim} is not available here ({str(err).splitlines()[0][:150]}); "
                            "use --optim auto.") from None
        kw.pop("fused", None)
        kw["foreach"] = True
        choice = "adamw_torch_foreach"
        optimizer = torch.optim.AdamW(groups, **kw)
    optimizer.implementation = choice
    return optimizer


def install_fast_dropout(model, args: TrainArguments, device: torch.device) -> Optional[dict]:
    """common/dropout.py's masks on CPU (not under torch.compile, whose own RNG is fast); None if not used."""
    if not (args.fast_dropout and device.type == "cpu" and not args.torch_compile):
        return None
    from . import dropout

    return dropout.install(model)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class Preempted(Exception):
    pass


@dataclass
class EvalResult:
    metrics: dict
    outputs: dict  # key -> np.ndarray, in dataset order of the eval dataloader


class Engine:
    def __init__(self, task: Task, model, args: TrainArguments, accelerator, output_dir: str,
                 train_dataset, eval_dataset, collator: PadCollator, identity: dict,
                 log_fn: Optional[Callable[[dict], None]] = None):
        self.task, self.args, self.accelerator = task, args, accelerator
        self.output_dir = output_dir
        self.ckpt_root = os.path.join(output_dir, CKPT_DIR)
        self.collator = collator
        self.identity = identity
        self.log_fn = log_fn or (lambda record: None)
        self.metric = args.metric_for_best_model or task.default_metric
        self.greater = args.greater_is_better if args.greater_is_better is not None else greater_is_better(self.metric)
        self.state = ckpt.TrainerState(num_processes=accelerator.num_processes, identity=identity)
        self._stop_signal: Optional[int] = None
        self.history: list[dict] = []
        self.last_eval: Optional[tuple[int, EvalResult]] = None  # (step, result) of the latest evaluation
        self.best_eval: Optional[tuple[int, EvalResult]] = None  # ... and of the best one (this session)
        self.first_step_seconds: Optional[float] = None  # the first optimizer step of this session

        # Evaluation runs under inference_mode; on CPU a batch 4x larger measured 5% slower (MLM, WikiText-2).
        self.eval_batch_size = args.per_device_eval_batch_size or (
            args.per_device_train_batch_size * (1 if accelerator.device.type == "cpu" else 4))
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.sampler = (LengthGroupedSampler(train_dataset["length"], args.per_device_train_batch_size, args.seed)
                        if args.group_by_length else SeededRandomSampler(len(train_dataset), args.seed))
        train_dl = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, sampler=self.sampler,
                              collate_fn=collator, num_workers=args.dataloader_num_workers,
                              pin_memory=accelerator.device.type == "cuda")
        eval_dl = self.eval_loader(eval_dataset) if eval_dataset is not None else None
        self.fast_dropout = install_fast_dropout(model, args, accelerator.device)
        optimizer = build_optimizer(model, args, accelerator.device)
        self.optimizer_implementation = optimizer.implementation
        if eval_dl is not None:
            self.model, self.optimizer, self.train_dl, self.eval_dl = accelerator.prepare(
                model, optimizer, train_dl, eval_dl)
        else:
            self.model, self.optimizer, self.train_dl = accelerator.prepare(model, optimizer, train_dl)
            self.eval_dl = None
        if hasattr(task, "after_prepare"):
            task.after_prepare(accelerator.unwrap_model(self.model))

        # Schedule lengths in optimizer steps, computed on the *prepared* (sharded) dataloader.
        accum = args.gradient_accumulation_steps
        self.batches_per_epoch = len(self.train_dl)
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / accum))
        self.total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * self.steps_per_epoch)
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * self.total_steps)
        # Token-level losses under length grouping: a step's batches hold sentences of one length, so
        # dividing each step by its own token count gives a token of a short-sentence step several
        # times the weight of one in a long-sentence step (measured on CoNLL-2003: -1 point of F1).
        # Dividing by the epoch's mean count per step weighs every token alike, as in the full-data loss.
        self.items_per_step: Optional[float] = None
        if args.group_by_length and hasattr(task, "total_items"):
            total = task.total_items(train_dataset)
            if total:
                self.items_per_step = float(total) / self.steps_per_epoch
        self.logging_steps = args.logging_steps or max(1, min(50, self.total_steps // 40))
        from transformers import get_scheduler

        # Not passed to prepare(): a prepared scheduler steps once per process; ours steps once per
        # optimizer step, which is the unit every length above is counted in.
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, num_warmup_steps=self.warmup_steps,
                                       num_training_steps=self.total_steps)
        # The schedule's position is saved as JSON in our trainer state (see save_checkpoint), not
        # through register_for_checkpointing, which accelerate unpickles with weights_only=False.

    # -- data -----------------------------------------------------------------------------------
    def eval_loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collator, num_workers=self.args.dataloader_num_workers)

    # -- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            logger.warning("received %s: saving a checkpoint at the next step boundary, then exiting",
                           signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some notebook setups)
                pass
        return previous

    def _stop_requested(self) -> bool:
        flag = torch.tensor(1.0 if self._stop_signal is not None else 0.0, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, kind: str = "periodic") -> str:
        self.state.kind = kind
        self.state.num_processes = self.accelerator.num_processes
        self.state.scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        name = BEST if kind == "best" else f"step_{self.state.global_step}"
        path = ckpt.save_checkpoint(self.accelerator, self.ckpt_root, name, self.state)
        if kind != "best" and self.accelerator.is_main_process:
            ckpt.rotate(self.ckpt_root, self.args.save_total_limit)
        self.state.kind = "periodic"
        return path

    def load_checkpoint(self, path: str) -> None:
        saved = ckpt.TrainerState.from_file(os.path.join(path, ckpt.STATE_FILE))
        for key, value in self.identity.items():
            if key in saved.identity and saved.identity[key] != value:
                raise UserError(f"--resume_from_checkpoint '{path}' belongs to a different run ({key} is "
                                f"{saved.identity[key]!r} there, {value!r} now); resume with the same settings "
                                "or start a new output_dir.")
        try:
            self.accelerator.load_state(path)
        except Exception as err:
            raise UserError(f"--resume_from_checkpoint '{path}' could not be loaded into this model "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from None
        if saved.num_processes != self.accelerator.num_processes and saved.batches_in_epoch:
            logger.warning("resuming a %d-process checkpoint on %d processes: the sample order continues, "
                           "the schedule is recomputed for the new global batch", saved.num_processes,
                           self.accelerator.num_processes)
        if saved.scheduler:
            self.scheduler.load_state_dict(dict(saved.scheduler, lr_lambdas=[None] * len(self.optimizer.param_groups)))
        saved.kind = "periodic"
        self.state = saved
        logger.info("resumed from %s at step %d (epoch %d, %d batches into it)", path, saved.global_step,
                    saved.epoch, saved.batches_in_epoch)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, dataloader=None) -> EvalResult:
        dataloader = dataloader if dataloader is not None else self.eval_dl
        acc = self.accelerator
        was_training = self.model.training
        self.model.eval()
        chunks: dict[str, list[np.ndarray]] = {}
        with torch.inference_mode():
            for batch in dataloader:
                outs = self.task.eval_outputs(self.model, batch)
                for key, pad in self.task.eval_pad_values.items():
                    if key in outs:
                        outs[key] = acc.pad_across_processes(outs[key], dim=1, pad_index=pad)
                outs = acc.gather_for_metrics(outs)
                for key, value in outs.items():
                    chunks.setdefault(key, []).append(value.float().cpu().numpy() if value.is_floating_point()
                                                      else value.cpu().numpy())
        if was_training:
            self.model.train()
        outputs = {k: _concat(v, self.task.eval_pad_values.get(k, 0)) for k, v in chunks.items()}
        return EvalResult(self.task.compute_metrics(outputs), outputs)

    def _is_better(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        best = self.state.best_metric
        if best is None:
            return True
        margin = self.args.early_stopping_threshold
        return value > best + margin if self.greater else value < best - margin

    def _evaluate_and_track(self) -> bool:
        """Evaluate, log, keep the best weights; True if early stopping says stop."""
        result = self.evaluate()
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        if self.metric not in metrics:
            raise UserError(f"--metric_for_best_model '{self.metric}' is not a metric of this task; "
                            f"choose one of {', '.join(sorted(metrics))}.")
        value = metrics[self.metric]
        improved = self._is_better(value)
        self.last_eval = (self.state.global_step, result)
        if improved:
            self.best_eval = (self.state.global_step, result)
        if improved:
            self.state.best_metric, self.state.best_step = float(value), self.state.global_step
            self.state.evals_without_improvement = 0
            if self.args.load_best_model_at_end:
                self.save_checkpoint("best")
        else:
            self.state.evals_without_improvement += 1
        count = len(next(iter(result.outputs.values()))) if result.outputs else 0
        self.record({"eval_" + k: v for k, v in metrics.items()} | {"eval_num_examples": count, "is_best": improved})
        patience = self.args.early_stopping_patience
        if patience and self.state.evals_without_improvement >= patience:
            logger.info("early stopping at step %d: %s did not improve for %d evaluations (best %.4f at step %s)",
                        self.state.global_step, self.metric, patience, self.state.best_metric or float("nan"),
                        self.state.best_step)
            return True
        return False

    # -- logging --------------------------------------------------------------------------------
    def record(self, values: dict) -> None:
        record = {"step": self.state.global_step, "epoch": round(self._epoch_float(), 4)} | values
        self.history.append(record)
        if self.accelerator.is_main_process:
            self.log_fn(record)
            nums = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.accelerator.log(nums, step=self.state.global_step)
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                             if not isinstance(v, (list, dict)))
            logger.info(shown)

    def _epoch_float(self) -> float:
        return self.state.epoch + self.state.batches_in_epoch / max(1, self.batches_per_epoch * self.accelerator.num_processes)

    # -- training -------------------------------------------------------------------------------
    def train(self, resume_from: Optional[str] = None) -> None:
        args, acc = self.args, self.accelerator
        if resume_from:
            self.load_checkpoint(resume_from)
        state = self.state
        logger.info("training: %d examples, %d processes, %d micro-batches/epoch/process, accumulation %d, "
                    "%d optimizer steps (%d epochs), warmup %d, precision %s (%s), device %s",
                    len(self.train_dataset), acc.num_processes, self.batches_per_epoch, args.gradient_accumulation_steps,
                    self.total_steps, self.num_epochs, self.warmup_steps, acc.mixed_precision,
                    getattr(acc, "precision_reason", ""), acc.device)
        previous_handlers = self._install_signal_handlers()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
                   disable=not (acc.is_local_main_process and sys.stderr.isatty()))
        # Per-step accumulators stay on the device; .item() only at logging steps.
        dev = acc.device
        log_loss = torch.zeros((), device=dev, dtype=torch.float64)
        log_items = torch.zeros((), device=dev, dtype=torch.float64)
        log_tokens = torch.zeros((), device=dev, dtype=torch.float64)
        log_padded = 0
        log_samples = 0
        grad_norm = None
        first_bad = torch.full((), -1, device=dev, dtype=torch.long)
        check_every_step = dev.type == "cpu"  # host syncs are free on CPU
        fixed_items = (None if self.items_per_step is None
                       else torch.tensor(self.items_per_step, device=dev, dtype=torch.float64))
        t_log = t_first = time.perf_counter()
        t_start = time.perf_counter() - state.train_seconds
        stop = state.global_step >= self.total_steps
        self.model.train()
        try:
            while not stop and state.epoch < self.num_epochs:
                epoch = state.epoch
                self.train_dl.set_epoch(epoch)
                skip = state.batches_in_epoch // acc.num_processes
                loader = acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
                if skip:
                    loader.set_epoch(epoch)
                batches_left = self.batches_per_epoch - skip
                iterator = iter(loader)
                while batches_left > 0 and not stop:
                    n = min(args.gradient_accumulation_steps, batches_left)
                    window = [next(iterator) for _ in range(n)]
                    batches_left -= n
                    if hasattr(self.task, "prepare_batch"):  # e.g. MLM masking: seeded per micro-batch
                        for i in range(n):
                            torch.manual_seed(self._micro_seed(i, stream=1))
                            window[i] = self.task.prepare_batch(window[i])
                    items = sum(self.task.count_items(b) for b in window).to(torch.float64)
                    if acc.num_processes > 1:
                        items = acc.reduce(items, reduction="sum")
                    # backward() divides by the accumulation steps; DDP averages over processes.
                    denominator = items.clamp(min=1) if fixed_items is None else fixed_items
                    scale = (acc.gradient_accumulation_steps * acc.num_processes) / denominator
                    window_loss = torch.zeros((), device=dev, dtype=torch.float64)
                    for i, batch in enumerate(window):
                        sync = i == n - 1
                        acc.gradient_state._set_sync_gradients(sync)
                        torch.manual_seed(self._micro_seed(i))
                        with (contextlib.nullcontext() if sync else acc.no_sync(self.model)):
                            loss = self.task.loss_sum(self.model, batch)
                            acc.backward(loss * scale.to(loss.dtype))
                        window_loss += loss.detach().to(torch.float64)
                        if "attention_mask" in batch:
                            log_tokens += batch["attention_mask"].sum()
                            log_padded += batch["attention_mask"].numel()
                        log_samples += len(batch["input_ids"])
                    finite = torch.isfinite(window_loss)
                    if args.skip_nonfinite:
                        if acc.num_processes > 1:
                            finite = acc.reduce(finite.float(), reduction="sum") >= acc.num_processes
                        if not bool(finite):
                            self.optimizer.zero_grad(set_to_none=True)
                            state.nonfinite_skipped += 1
                            logger.warning("non-finite loss at step %d: step skipped (%d so far)",
                                           state.global_step + 1, state.nonfinite_skipped)
                            state.global_step += 1
                            state.batches_in_epoch += n * acc.num_processes
                            bar.update(1)
                            continue
                    else:
                        first_bad = torch.where((first_bad < 0) & ~finite,
                                                torch.full_like(first_bad, state.global_step + 1), first_bad)
                    if args.max_grad_norm > 0:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    if not acc.optimizer_step_was_skipped:
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    log_loss += window_loss
                    log_items += items
                    state.global_step += 1
                    state.batches_in_epoch += n * acc.num_processes
                    state.samples_seen += sum(len(b["input_ids"]) for b in window) * acc.num_processes
                    bar.update(1)
                    step = state.global_step
                    at_log = step % self.logging_steps == 0 or step == self.total_steps
                    if check_every_step or at_log:
                        self._check_finite(first_bad)
                    if at_log:
                        now = time.perf_counter()
                        loss_sum = acc.reduce(log_loss, reduction="sum") if acc.num_processes > 1 else log_loss
                        tokens = acc.reduce(log_tokens, reduction="sum") if acc.num_processes > 1 else log_tokens
                        elapsed = max(now - t_log, 1e-9)
                        state.tokens_seen += int(tokens)
                        state.padded_tokens_seen += log_padded * acc.num_processes
                        record = {"loss": float(loss_sum / log_items.clamp(min=1)),
                                  "learning_rate": float(self.scheduler.get_last_lr()[0]),
                                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                  "samples_per_second": log_samples * acc.num_processes / elapsed,
                                  "tokens_per_second": float(tokens) / elapsed,
                                  "padded_tokens_per_second": log_padded * acc.num_processes / elapsed}
                        self.record(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                        log_loss.zero_(); log_items.zero_(); log_tokens.zero_()
                        log_padded = log_samples = 0
                        t_log = time.perf_counter()
                    end_of_epoch = batches_left == 0
                    if end_of_epoch:
                        state.epoch += 1
                        state.batches_in_epoch = 0
                    stop = step >= self.total_steps
                    state.train_seconds = time.perf_counter() - t_start
                    if self.first_step_seconds is None:  # with --torch_compile: mostly compilation
                        self.first_step_seconds = time.perf_counter() - t_first
                    t_side = time.perf_counter()
                    if self.eval_dl is not None and (
                            (args.eval_strategy == "steps" and step % args.eval_steps == 0)
                            or (args.eval_strategy == "epoch" and end_of_epoch)):
                        self._check_finite(first_bad)
                        stop = self._evaluate_and_track() or stop
                        state.eval_seconds += time.perf_counter() - t_side
                    t_ckpt = time.perf_counter()
                    ck = args.checkpointing_steps
                    if ck and ((ck == "epoch" and end_of_epoch) or (ck != "epoch" and step % int(ck) == 0)):
                        self._check_finite(first_bad)
                        self.save_checkpoint()
                        state.checkpoint_seconds += time.perf_counter() - t_ckpt
                    t_log += time.perf_counter() - t_side  # logged speeds count training time only
                    if (check_every_step or at_log) and self._stop_requested():
                        self._check_finite(first_bad)
                        path = self.save_checkpoint("preempted")
                        raise Preempted(path)
                if state.epoch == epoch:  # left the epoch early (max_steps or early stopping)
                    break
        finally:
            bar.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        self._check_finite(first_bad)
        state.train_seconds = time.perf_counter() - t_start

    def _micro_seed(self, i: int, stream: int = 0) -> int:
        """The RNG seed of micro-batch i of the coming optimizer step on this process: dropout and
        masking depend on the step alone, so a resumed run draws what the uninterrupted one drew."""
        micro = self.state.global_step * self.args.gradient_accumulation_steps + i
        base = (self.args.seed * 1_000_003 + micro) * 4099 + self.accelerator.process_index
        return base if stream == 0 else (base * 7919 + stream) % 2**63

    def evaluate_initial(self) -> None:
        """Evaluate the weights before any training step (logged at step 0, kept in the trainer state)."""
        result = self.evaluate()
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        self.state.initial_eval = metrics
        self.record({"eval_" + k: v for k, v in metrics.items()} | {"initial": True})

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        """Collective: raise if any process saw a non-finite loss (first_bad = its step, or -1)."""
        seen = first_bad.reshape(1)
        if self.accelerator.num_processes > 1:
            seen = self.accelerator.gather(seen)
        seen = seen[seen > 0]
        bad = int(seen.min()) if len(seen) else -1
        if bad > 0:
            raise UserError(f"the training loss became NaN/inf at optimizer step {bad}; lower --learning_rate, "
                            "keep --max_grad_norm > 0, check the data, or pass --skip_nonfinite to skip such steps. "
                            "No weights were saved from that point.")

    # -- the end --------------------------------------------------------------------------------
    def result_for_final_weights(self, restored: bool) -> Optional[EvalResult]:
        """The evaluation already made of the weights that will be saved, if any (no need to repeat it)."""
        if restored:
            if self.best_eval is not None and self.best_eval[0] == self.state.best_step:
                return self.best_eval[1]
            return None
        if self.last_eval is not None and self.last_eval[0] == self.state.global_step:
            return self.last_eval[1]
        return None

    def restore_best(self) -> bool:
        """Load the best evaluated weights into the model (collective). True if there were any."""
        best = os.path.join(self.ckpt_root, BEST)
        if not (self.args.load_best_model_at_end and ckpt.is_complete(best)):
            return False
        best_state = ckpt.TrainerState.from_file(os.path.join(best, ckpt.STATE_FILE))
        current = self.state
        self.accelerator.load_state(best)
        self.state = current  # keep the counters of the finished run
        logger.info("loaded the best weights (step %s, %s=%.4f)", best_state.best_step, self.metric,
                    best_state.best_metric)
        return True

    def save_model(self, tokenizer, output_dir: Optional[str] = None) -> None:
        """save_pretrained of full weights on the main process (gathered under FSDP/ZeRO-3; collective)."""
        output_dir = output_dir or self.output_dir
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.model)
        unwrapped = acc.unwrap_model(self.model)
        if self.fast_dropout:  # the saved config keeps the model's own attention setting
            from . import dropout

            dropout.uninstall(unwrapped, self.fast_dropout)
        if acc.is_main_process:
            unwrapped.save_pretrained(output_dir, state_dict=state_dict, save_function=acc.save,
                                      safe_serialization=True)
            tokenizer.save_pretrained(output_dir)
        acc.wait_for_everyone()

    def cleanup_best(self) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(os.path.join(self.ckpt_root, BEST), ignore_errors=True)
            if os.path.isdir(self.ckpt_root) and not os.listdir(self.ckpt_root):
                os.rmdir(self.ckpt_root)
        self.accelerator.wait_for_everyone()


def _concat(arrays: list[np.ndarray], pad) -> np.ndarray:
    if not arrays:
        return np.zeros((0,))
    if arrays[0].ndim >= 2:
        width = max(a.shape[1] for a in arrays)
        padded = []
        for a in arrays:
            if a.shape[1] < width:
                shape = (a.shape[0], width - a.shape[1]) + a.shape[2:]
                a = np.concatenate([a, np.full(shape, pad, dtype=a.dtype)], axis=1)
            padded.append(a)
        arrays = padded
    return np.concatenate(arrays, axis=0)

