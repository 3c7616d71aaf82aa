"""THE training loop, shared by the three scripts.

`Trainer.train` reads top to bottom: take the micro-batches of one optimizer step (a window),
forward/backward each with an exact item-normalised loss, step the optimizer, then maybe log,
evaluate, checkpoint or stop for a preemption signal. Each piece is a named method below it.
The objects it drives (prepared model, optimizer, schedule, loaders, step counts) come from
build.py; what a batch's loss is comes from the task's `Objective` (task.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import time
from typing import Callable, Optional

import torch

from .. import progress
from ..config import TrainArguments
from ..errors import Diverged, UserError
from ..files import honour_umask_files
from ..log import logger
from . import capture
from . import checkpoint as ckpt
from .build import Training
from .evaluation import EvalResult, evaluate
from .metrics import greater_is_better
from .runtime import Runtime, set_sync_gradients

CKPT_DIR = "checkpoints"
BEST = "best"


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was saved (its path is the message)."""


class StepMeter:
    """Loss, items, tokens and samples since the last log line. Kept on the device: reading them
    (a host sync on GPUs) happens only at logging steps."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.items = torch.zeros((), device=device, dtype=torch.float64)
        self.tokens = torch.zeros((), device=device, dtype=torch.float64)
        self.padded = 0
        self.samples = 0
        self.t_log = time.perf_counter()

    def add_batch(self, batch: dict) -> None:
        if "attention_mask" in batch:
            self.tokens += batch["attention_mask"].sum()
            self.padded += batch["attention_mask"].numel()
        self.samples += len(batch["input_ids"])

    def add_step(self, loss: torch.Tensor, items: torch.Tensor) -> None:
        self.loss += loss
        self.items += items

    def exclude(self, seconds: float) -> None:
        """Time spent evaluating or checkpointing does not count in the logged speeds."""
        self.t_log += seconds

    def read(self, accelerator) -> tuple[float, float, int, int, float]:
        """(mean loss, tokens, padded tokens, samples, seconds) over all processes; then reset."""
        n = accelerator.num_processes
        loss = accelerator.reduce(self.loss, reduction="sum") if n > 1 else self.loss
        tokens = accelerator.reduce(self.tokens, reduction="sum") if n > 1 else self.tokens
        out = (float(loss / self.items.clamp(min=1)), float(tokens), self.padded * n, self.samples * n,
               max(time.perf_counter() - self.t_log, 1e-9))
        self.loss.zero_(), self.items.zero_(), self.tokens.zero_()
        self.padded = self.samples = 0
        self.t_log = time.perf_counter()
        return out


class Trainer:
    def __init__(self, objective, training: Training, args: TrainArguments, runtime: Runtime, output_dir: str,
                 identity: dict, log_fn: Optional[Callable[[dict], None]] = None):
        accelerator = runtime.accelerator
        self.objective, self.training, self.args, self.accelerator = objective, training, args, accelerator
        self.precision_reason = runtime.precision_reason
        self.model = training.model
        self.output_dir = output_dir
        self.ckpt_root = os.path.join(output_dir, CKPT_DIR)
        self.identity = identity
        self.log_fn = log_fn or (lambda record: None)
        self.metric = args.metric_for_best_model or objective.default_metric
        self.greater = args.greater_is_better if args.greater_is_better is not None else greater_is_better(self.metric)
        self.state = ckpt.TrainerState(num_processes=accelerator.num_processes, identity=identity,
                                       state_format=ckpt.state_format(accelerator))
        self.history: list[dict] = []  # every log record of the run, a resumed checkpoint's included
        self.resumed: Optional[ckpt.Checked] = None  # the checkpoint this session started from, if any
        self.last_eval: Optional[tuple[int, EvalResult]] = None  # (step, result) of the latest evaluation
        self.best_eval: Optional[tuple[int, EvalResult]] = None  # ... and of the best one (this session)
        self.first_step_seconds: Optional[float] = None  # the first optimizer step of this session
        self._stop_signal: Optional[int] = None
        # Called on every rank after each evaluation during training with (step, epoch, value of self.metric,
        # whether it is the last step); a study's pruning raises from it to stop the run (runs/study.py).
        self.on_evaluate: Optional[Callable[[int, float, float, bool], None]] = None
        self._first_bad = torch.full((), -1, device=accelerator.device, dtype=torch.long)  # step of a NaN/inf loss
        self._grad_norm = None
        # --cuda_graphs: the captured programs (capture.py), made when training starts; None: eager steps.
        self.graphs: Optional[capture.StepGraphs] = None
        self.graph_stats = capture.Stats(mode=args.cuda_graphs, buckets=list(training.buckets or ()))
        # The fixed per-step loss denominator of token tasks under length grouping (see build.py).
        self._fixed_items = (None if training.items_per_step is None else
                             torch.tensor(training.items_per_step, device=accelerator.device, dtype=torch.float64))

    # -- the loop -------------------------------------------------------------------------------
    def train(self, resume_from: Optional[ckpt.Checked] = None) -> None:
        args, acc, t = self.args, self.accelerator, self.training
        if resume_from:
            self.load_checkpoint(resume_from)
        state = self.state
        meter = StepMeter(acc.device)
        self.graphs = self._make_graphs(meter)
        logger.info("training: %d examples, %d processes, %d micro-batches/epoch/process, accumulation %d, "
                    "%d optimizer steps (%d epochs), warmup %d, precision %s (%s), device %s, %s",
                    t.train_examples, acc.num_processes, t.batches_per_epoch, args.gradient_accumulation_steps,
                    t.total_steps, t.num_epochs, t.warmup_steps, acc.mixed_precision, self.precision_reason, acc.device,
                    f"CUDA graphs (--cuda_graphs {args.cuda_graphs})" if self.graphs is not None
                    else f"eager steps ({self.graph_stats.reason})")
        # Reading the NaN flag is a host sync: every step on CPU (free), unless the steps run as graphs would on
        # a GPU (BERT_FINETUNE_CAPTURE=simulate), so that tests see the GPU's syncs.
        check_every_step = acc.device.type == "cpu" and self.graphs is None
        t_start = time.perf_counter() - state.train_seconds  # a resumed run keeps counting its time
        t_first = time.perf_counter()
        self.model.train()
        with self._signal_handlers(), progress.bar(t.total_steps, "train", initial=state.global_step) as bar:
            for window, end_of_epoch in self._windows():
                window = self._prepare_window(window)
                if self._step(window, meter):  # False: a non-finite step skipped (--skip_nonfinite)
                    state.samples_seen += sum(len(b["input_ids"]) for b in window) * acc.num_processes
                state.global_step += 1
                state.batches_in_epoch += len(window) * acc.num_processes
                bar.update(1)
                step = state.global_step
                at_log = step % t.logging_steps == 0 or step == t.total_steps
                if check_every_step or at_log:
                    self._check_finite()
                if at_log:
                    bar.set_postfix(loss=f"{self._log_step(meter):.4f}")
                if end_of_epoch:
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                stop = step >= t.total_steps
                state.train_seconds = time.perf_counter() - t_start
                if self.first_step_seconds is None:  # with --torch_compile: mostly compilation
                    self.first_step_seconds = time.perf_counter() - t_first
                t_side = time.perf_counter()
                stop = self._maybe_evaluate(step, end_of_epoch) or stop
                self._maybe_checkpoint(step, end_of_epoch)
                meter.exclude(time.perf_counter() - t_side)
                # Every rank must agree to stop: a collective, so only where the NaN check syncs anyway.
                if (check_every_step or at_log) and self._stop_requested():
                    self._check_finite()
                    raise Preempted(self.save_checkpoint("preempted"))
                if stop:
                    break
        self._check_finite()
        state.train_seconds = time.perf_counter() - t_start

    def _windows(self):
        """Yield (micro-batches of one optimizer step, whether they end the epoch) until the last step.

        The sampler's order depends on (seed, epoch) only, so a resumed run skips the batches its epoch
        had consumed (counted over all processes) and sees exactly what the uninterrupted run saw."""
        state, t, acc = self.state, self.training, self.accelerator
        while state.epoch < t.num_epochs and state.global_step < t.total_steps:
            epoch = state.epoch
            t.train_dl.set_epoch(epoch)
            skip = state.batches_in_epoch // acc.num_processes
            loader = acc.skip_first_batches(t.train_dl, skip) if skip else t.train_dl
            if skip:
                loader.set_epoch(epoch)
            left, batches = t.batches_per_epoch - skip, iter(loader)
            while left > 0:
                n = min(self.args.gradient_accumulation_steps, left)  # the epoch's last window may be short
                left -= n
                yield [next(batches) for _ in range(n)], left == 0
            if state.epoch == epoch:  # the consumer did not finish the epoch (cannot happen; never loop)
                return

    def _prepare_window(self, window: list) -> list:
        """Task batch preparation (MLM masking) on the device, seeded by the step: resumable draws."""
        for i in range(len(window)):
            torch.manual_seed(self._micro_seed(i, stream=1))
            window[i] = self.objective.prepare_batch(window[i])
        return window

    def _make_graphs(self, meter: StepMeter) -> Optional[capture.StepGraphs]:
        """The captured programs of this run, or None (the reason in graph_stats, logged with the training line)."""
        t = self.training
        reason = capture.static_reason(self.args, self.accelerator, t.optimizer_implementation)
        if reason is None:
            try:
                graphs = capture.StepGraphs(self.objective, t, self.args, self.accelerator, meter, self._first_bad,
                                            self.graph_stats, t.train_shapes)
                graphs.start(self.state.global_step)
                return graphs
            except capture.NotCapturable as err:
                reason = str(err)
        self.graph_stats.reason = reason
        if self.args.cuda_graphs == "on":
            logger.warning("--cuda_graphs on: the steps run eagerly: %s", reason)
        return None

    def _step(self, window: list, meter: StepMeter) -> bool:
        """Forward, backward and the optimizer step of one window: replayed as CUDA graphs, or eagerly."""
        if self.graphs is not None:
            set_sync_gradients(self.accelerator, True)  # accelerate's optimizer wrapper steps at a window's end
            self.graphs.run_window(window, self._micro_seed)  # adds to the meter on the device
            self._grad_norm = self.graphs.grad_norm if self.args.max_grad_norm > 0 else None
            return True
        items, loss = self._forward_backward(window, meter)
        if not self._optimizer_step(loss):
            return False
        meter.add_step(loss, items)
        return True

    def _forward_backward(self, window: list, meter: StepMeter) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradients of one window; returns (items over all processes, summed loss here)."""
        acc = self.accelerator
        items = sum(self.objective.count_items(b) for b in window).to(torch.float64)
        if acc.num_processes > 1:
            items = acc.reduce(items, reduction="sum")
        # backward() divides by the accumulation steps and DDP (or FSDP's reduce-scatter) averages over
        # processes: undo both and divide by the items of the whole window on all processes, so every
        # item weighs the same.
        denominator = items.clamp(min=1) if self._fixed_items is None else self._fixed_items
        scale = (acc.gradient_accumulation_steps * acc.num_processes) / denominator
        window_loss = torch.zeros((), device=acc.device, dtype=torch.float64)
        for i, batch in enumerate(window):
            sync = i == len(window) - 1  # all-reduce gradients on the window's last backward only
            set_sync_gradients(acc, sync)
            torch.manual_seed(self._micro_seed(i))  # dropout drawn from (seed, step, micro-batch, rank)
            with (contextlib.nullcontext() if sync else acc.no_sync(self.model)):
                loss = self.objective.loss_sum(self.model, batch)
                acc.backward(loss * scale.to(loss.dtype))
            window_loss += loss.detach().to(torch.float64)
            meter.add_batch(batch)
        return items, window_loss

    def _optimizer_step(self, window_loss: torch.Tensor) -> bool:
        """Clip, step, schedule. With --skip_nonfinite a NaN/inf window is dropped (a host sync per
        step); otherwise the first bad step is remembered on the device and reported at the next check."""
        acc, state = self.accelerator, self.state
        finite = torch.isfinite(window_loss)
        if self.args.skip_nonfinite:
            if acc.num_processes > 1:
                finite = acc.reduce(finite.float(), reduction="sum") >= acc.num_processes
            if not bool(finite):
                self.training.optimizer.zero_grad(set_to_none=True)
                state.nonfinite_skipped += 1
                logger.warning("non-finite loss at step %d: step skipped (%d so far)", state.global_step + 1,
                               state.nonfinite_skipped)
                return False
        else:
            self._first_bad = torch.where((self._first_bad < 0) & ~finite,
                                          torch.full_like(self._first_bad, state.global_step + 1), self._first_bad)
        if self.args.max_grad_norm > 0:
            self._grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.training.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 loss scaler skipped the step: the schedule waits too
            self.training.scheduler.step()
        self.training.optimizer.zero_grad(set_to_none=True)
        return True

    def _log_step(self, meter: StepMeter) -> float:
        loss, tokens, padded, samples, seconds = meter.read(self.accelerator)
        self.state.tokens_seen += int(tokens)
        self.state.padded_tokens_seen += padded
        self.record({"loss": loss, "learning_rate": float(self.training.scheduler.get_last_lr()[0]),
                     "grad_norm": float(self._grad_norm) if self._grad_norm is not None else None,
                     "samples_per_second": samples / seconds, "tokens_per_second": tokens / seconds,
                     "padded_tokens_per_second": padded / seconds})
        return loss

    def _maybe_evaluate(self, step: int, end_of_epoch: bool) -> bool:
        """Evaluate when the strategy says so; True if early stopping says stop."""
        a = self.args
        due = (a.eval_strategy == "steps" and step % a.eval_steps == 0) or (a.eval_strategy == "epoch" and end_of_epoch)
        if self.training.eval_dl is None or not due:
            return False
        started = time.perf_counter()
        self._check_finite()
        stop = self._evaluate_and_track()
        self.state.eval_seconds += time.perf_counter() - started
        if self.on_evaluate is not None:
            value = self.last_eval[1].metrics.get(self.metric)
            self.on_evaluate(step, self._epoch_float(), value, stop or step >= self.training.total_steps)
        return stop

    def _maybe_checkpoint(self, step: int, end_of_epoch: bool) -> None:
        every = self.args.checkpointing_steps
        if not every or not ((every == "epoch" and end_of_epoch) or (every != "epoch" and step % int(every) == 0)):
            return
        started = time.perf_counter()
        self._check_finite()
        self.save_checkpoint()
        self.state.checkpoint_seconds += time.perf_counter() - started

    def _micro_seed(self, i: int, stream: int = 0) -> int:
        """The RNG seed of micro-batch i of the coming optimizer step on this process: dropout and
        masking depend on the step alone, so a resumed run draws what the uninterrupted one drew."""
        micro = self.state.global_step * self.args.gradient_accumulation_steps + i
        base = (self.args.seed * 1_000_003 + micro) * 4099 + self.accelerator.process_index
        return base if stream == 0 else (base * 7919 + stream) % 2**63

    def _check_finite(self) -> None:
        """Collective: raise if any process saw a non-finite loss (its first bad step, or -1)."""
        seen = self._first_bad.reshape(1)
        if self.accelerator.num_processes > 1:
            seen = self.accelerator.gather(seen)
        seen = seen[seen > 0]
        bad = int(seen.min()) if len(seen) else -1
        if bad > 0:
            raise Diverged(f"the training loss became NaN/inf at optimizer step {bad}; lower --learning_rate, "
                            "keep --max_grad_norm > 0, check the data, or pass --skip_nonfinite to skip such steps. "
                            "No weights were saved from that point.")

    # -- preemption -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signal_handlers(self):
        """SIGTERM/SIGINT: save a checkpoint at the next step boundary and exit (a second one: now)."""
        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            logger.warning("received %s: saving a checkpoint at the next step boundary, then exiting",
                           signal.Signals(signum).name)

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some notebook setups)
                pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_requested(self) -> bool:
        flag = torch.tensor(1.0 if self._stop_signal is not None else 0.0, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, kind: str = "periodic") -> str:
        self.state.kind = kind
        self.state.num_processes = self.accelerator.num_processes
        # (with --cuda_graphs the learning rates are device tensors: saved as numbers)
        self.state.scheduler = {k: ckpt.plain(v) for k, v in self.training.scheduler.state_dict().items()
                                if k != "lr_lambdas"}
        name = BEST if kind == "best" else f"step_{self.state.global_step}"
        # The best weights are only ever read back as weights (restore_best): no optimizer state, 1/3 of the bytes.
        optimizer = None if kind == "best" else self.training.optimizer
        path = ckpt.save_checkpoint(self.accelerator, self.model, optimizer, self.ckpt_root, name, self.state,
                                    self.history)
        if kind != "best" and self.accelerator.is_main_process:
            ckpt.rotate(self.ckpt_root, self.args.save_total_limit)
        self.state.kind = "periodic"
        return path

    def check_checkpoint(self, path: str) -> ckpt.Checked:
        """Before anything is written: `path` is a checkpoint of this very run that fits the model and optimizer;
        returns its state and log history."""
        return ckpt.check_checkpoint(path, self.identity, self.accelerator, self.model, self.training.optimizer)

    def load_checkpoint(self, checked: ckpt.Checked) -> None:
        """Load a checkpoint that check_checkpoint accepted (collective): weights, optimizer, schedule, counters,
        and the log records up to its step."""
        path, saved = checked.path, dataclasses.replace(checked.state)  # `checked` keeps the state as it was read
        try:
            ckpt.read_state(self.accelerator, self.model, self.training.optimizer, path)
        except Exception as err:
            raise UserError(f"--resume_from_checkpoint '{path}' could not be loaded into this model "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from None
        if saved.num_processes != self.accelerator.num_processes and saved.batches_in_epoch:
            logger.warning("resuming a %d-process checkpoint on %d processes: the sample order continues, "
                           "the schedule is recomputed for the new global batch", saved.num_processes,
                           self.accelerator.num_processes)
        if saved.scheduler:
            groups = len(self.training.optimizer.param_groups)
            self.training.scheduler.load_state_dict(dict(saved.scheduler, lr_lambdas=[None] * groups))
        saved.kind = "periodic"
        self.state, self.resumed = saved, checked
        self.history = [dict(r) for r in checked.history]
        logger.info("resumed from %s at step %d (epoch %d, %d batches into it; %.1f s of training before)", path,
                    saved.global_step, saved.epoch, saved.batches_in_epoch, saved.train_seconds)

    @property
    def session_train_seconds(self) -> float:
        """Training-loop seconds of this session alone (state.train_seconds counts the resumed sessions too)."""
        return self.state.train_seconds - (self.resumed.state.train_seconds if self.resumed else 0.0)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, dataloader=None, desc: str = "eval") -> EvalResult:
        """Collective: evaluate the model on a prepared loader (default: the validation loader)."""
        loader = dataloader if dataloader is not None else self.training.eval_dl
        graphs = self.graphs
        run = None if graphs is None else (lambda batch: graphs.eval_outputs(batch, self.training.eval_batch_size))
        return evaluate(self.model, self.objective, loader, self.accelerator, desc, run_batch=run)

    def evaluate_initial(self) -> None:
        """Evaluate the weights before any training step (logged at step 0, kept in the trainer state)."""
        result = self.evaluate()
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        self.state.initial_eval = metrics
        self.record({"eval_" + k: v for k, v in metrics.items()} | {"initial": True})

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
            self.state.best_metric, self.state.best_step = float(value), self.state.global_step
            self.state.evals_without_improvement = 0
            if self.args.load_best_model_at_end:
                self.save_checkpoint("best")
        else:
            self.state.evals_without_improvement += 1
        self.record({"eval_" + k: v for k, v in metrics.items()}
                    | {"eval_num_examples": result.num_examples, "is_best": improved})
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
            logger.info(self._log_line(record))

    def _log_line(self, record: dict) -> str:
        """One short line per record: the step, then the loss and speed (training) or the metric that picks the
        best model and the loss (evaluation). Every value is in log_history.jsonl and the trackers."""
        def fmt(value) -> str:
            return f"{value:.4g}" if isinstance(value, float) else str(value)

        head = f"step {record['step']}/{self.training.total_steps} (epoch {record['epoch']:.2f})"
        if any(k.startswith("eval_") for k in record):
            kind = "starting weights" if record.get("initial") else "eval"
            shown = [f"{name} {fmt(record['eval_' + name])}" for name in dict.fromkeys((self.metric, "loss"))
                     if "eval_" + name in record]
            return f"{kind} at {head}: " + ", ".join(shown) + (" (best so far)" if record.get("is_best") else "")
        parts = [f"loss {fmt(record.get('loss'))}", f"lr {record.get('learning_rate', 0):.3g}"]
        if record.get("grad_norm") is not None:
            parts.append(f"grad norm {record['grad_norm']:.3g}")
        if record.get("samples_per_second"):
            parts.append(f"{record['samples_per_second']:.1f} samples/s")
        return f"{head}: " + ", ".join(parts)

    def _epoch_float(self) -> float:
        per_epoch = max(1, self.training.batches_per_epoch * self.accelerator.num_processes)
        return self.state.epoch + self.state.batches_in_epoch / per_epoch

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
        ckpt.read_state(self.accelerator, self.model, None, best)  # the weights; the counters stay the run's
        logger.info("loaded the best weights (step %s, %s=%.4f)", best_state.best_step, self.metric,
                    best_state.best_metric)
        return True

    def save_model(self, tokenizer, output_dir: Optional[str] = None) -> None:
        """save_pretrained of full weights on the main process (gathered under FSDP/ZeRO-3; collective)."""
        output_dir = output_dir or self.output_dir
        acc = self.accelerator
        unwrapped = acc.unwrap_model(self.model)
        # training-only weights (a distillation projection) stay in checkpoints, not in the saved model
        state_dict = self.objective.state_for_saving(unwrapped, acc.get_state_dict(self.model))
        if self.training.fast_dropout:  # the saved config keeps the model's own attention setting
            from . import dropout

            dropout.uninstall(unwrapped, self.training.fast_dropout)
        if acc.is_main_process:
            unwrapped.save_pretrained(output_dir, state_dict=state_dict, save_function=acc.save,
                                      safe_serialization=True)
            tokenizer.save_pretrained(output_dir)
            honour_umask_files(output_dir)  # safetensors writes model.safetensors with mode 0600
        acc.wait_for_everyone()

    def cleanup_best(self) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(os.path.join(self.ckpt_root, BEST), ignore_errors=True)
            if os.path.isdir(self.ckpt_root) and not os.listdir(self.ckpt_root):
                os.rmdir(self.ckpt_root)
        self.accelerator.wait_for_everyone()
