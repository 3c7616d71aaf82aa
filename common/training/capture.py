"""Captured steps (--cuda_graphs): each training micro-batch, optimizer step and evaluation batch replayed as a
CUDA graph, one graph per padded shape.

Why. A TinyBERT/MiniLM step on a data-centre GPU is 20-30 ms of Python and kernel launches around well under a
millisecond of arithmetic (issue 24: 345 MRPC steps took 7-10 s on an H200). A CUDA graph launches the whole
recorded step with one call, so the step costs what its kernels cost.

How, and why this way. `torch.cuda.CUDAGraph` by hand, with static buffers, rather than
`torch.compile(mode="reduce-overhead")`: inductor's compile of MiniLM took a minute on an H100, longer than a
whole MRPC run, and recompiles for new shapes; recording a graph costs one eager run of the step. The pieces:

- **Shapes.** The collator pads lengths to a few buckets (`data.collate.graph_buckets`: multiples of 32 up to
  128, of 64 up to 512, ...), so a run records a handful of graphs. A batch of another row count (an epoch's
  short last batch) runs the same code eagerly.
- **Programs.** A training window runs as: the items of the window counted on the device (and all-reduced),
  one *micro* program per micro-batch (forward, backward into one flat gradient buffer, the loss summed on the
  device), the gradients all-reduced as one buffer between graphs (several processes), then the *step* program
  (finite check, clipping, the fused AdamW step with its learning rate in a device tensor, gradients zeroed,
  counters). The schedule fills the learning-rate tensor between replays. Evaluation batches run an *eval*
  program: the objective's `eval_outputs`.
- **When a graph is recorded.** The first time a shape occurs its program runs eagerly, under a detector of
  host synchronisations (`find_syncs`): an objective that reads the device (`.item()`, boolean indexing,
  `nonzero`) cannot be captured, and the run says so once and stays eager. The second time it is recorded and
  replayed; from then on, replayed. So every step is a real step, once: no warm-up steps are added.
- **Same results.** Dropout draws from the seed the loop sets before each micro-batch (`torch.manual_seed` before
  a replay reseeds the graph's random numbers), so a resumed run replays the uninterrupted one. The loss
  normalisation is the eager loop's: every item of the window weighs the same on any number of processes.
- **No host synchronisation per step.** Loss, item and token sums, the first non-finite step and the gradient
  norm stay on the device; the loop reads them at logging, evaluation and checkpoint steps only.
- **auto.** On CUDA the run measures: the first window whose programs have all run once (warmed up) runs eagerly
  once more and is timed (CUDA events), the first three fully replayed windows are timed too, and the graphs stay
  only if a replay is faster and the saving over the steps left pays for the graphs still to record
  (`keep_graphs`). Otherwise the rest of the run executes the same programs eagerly, and says why.

Nothing of this needs a GPU to be tested except the recording itself: `BERT_FINETUNE_CAPTURE=simulate` runs the
very same programs on any device with "record" meaning "remember the function" (tests/test_capture.py).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import UserError
from ..log import logger

SIMULATE_ENV = "BERT_FINETUNE_CAPTURE"  # "simulate": record = keep the function (tests on CPU)
# Ops that make the host wait for the device on CUDA: reading a value (.item(), bool(), float()), or an output
# whose size depends on the values (nonzero, boolean masks, unique...). None can be recorded in a graph.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique", "_unique2",
            "unique_consecutive", "bincount", "repeat_interleave", "equal", "allclose", "is_nonzero",
            "histc"}
# Measured replay must beat eager by this share to be kept (timer noise).
MIN_GAIN = 0.05


# -- host synchronisations -------------------------------------------------------------------------------
def _op_syncs(func, args, kwargs) -> bool:
    name = func._schema.name.split("::")[-1]
    if name in SYNC_OPS:
        return name != "repeat_interleave" or kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # a boolean mask index is a nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype == torch.bool for t in indices)
    if name in ("copy_", "_to_copy"):  # a blocking copy between the host and the device
        src = args[1] if name == "copy_" else args[0]
        dst_device = args[0].device if name == "copy_" else kwargs.get("device")
        blocking = not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2] is True)
        return (isinstance(src, torch.Tensor) and dst_device is not None and blocking
                and (src.device.type == "cpu") != (torch.device(dst_device).type == "cpu"))
    return False


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module: where a sync comes from."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/" not in path and not path.endswith("training/capture.py"):
            parts = path.split("/")
            short = "/".join(parts[-2:]) if "site-packages" not in parts else "/".join(
                parts[parts.index("site-packages") + 1:])
            return f"{short}:{frame.lineno}"
    return "torch"


@contextlib.contextmanager
def as_if_capturing():
    """Code that asks PyTorch whether a graph is being recorded takes its recording path: transformers builds the
    attention mask instead of reading `mask.all()` on the host when it is told so. A shape's first, eager run and
    every simulated replay run this way, so they run what the GPU records."""
    real = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_current_stream_capturing = real


def find_syncs(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run fn() and return (its result, the names of the ops in it that synchronise the host with a GPU).
    Works on any device: it looks at which ops run, not at how long they take."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[str] = []

    class Detector(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if _op_syncs(func, args, kwargs):
                found.append(f"{func._schema.name.split('::')[-1]} in {_caller()}")
            return func(*args, **kwargs)

    with Detector():
        result = fn()
    return result, found


# -- backends ----------------------------------------------------------------------------------------------
class CudaRecorder:
    """Records programs as CUDA graphs that share one memory pool, on a side stream."""

    simulated = False

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def record(self, fn: Callable[[], Any]) -> tuple[Callable[[], Any], Any]:
        """(replay, the outputs fn returned during recording: static tensors every replay rewrites). Nothing runs."""
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            # thread_local: a DataLoader pinning thread may call CUDA meanwhile
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                outputs = fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

        def replay():
            graph.replay()
            return outputs

        return replay, outputs

    def eager(self, fn: Callable[[], Any]) -> Any:
        """A shape's first (warm-up) run: on the recording stream, as PyTorch's graph recipe asks."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def timer(self) -> "EventTimer":
        return EventTimer(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class SimulatedRecorder:
    """The same protocol on any device: recording keeps the function, a replay calls it (tests)."""

    simulated = True

    def __init__(self, device: torch.device):
        self.device = device

    def record(self, fn):
        def replay():
            with as_if_capturing():
                return fn()

        return replay, None

    def eager(self, fn):
        return fn()

    def timer(self) -> "WallTimer":
        return WallTimer()

    def synchronize(self) -> None:
        pass


class EventTimer:
    """Milliseconds between start() and stop() on the device, read later (reading waits for the device)."""

    def __init__(self, device):
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def start(self):
        self.begin.record()

    def stop(self):
        self.end.record()

    def ms(self) -> float:
        self.end.synchronize()
        return self.begin.elapsed_time(self.end)


class WallTimer:
    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        self._ms = (time.perf_counter() - self._t0) * 1000

    def ms(self) -> float:
        return self._ms


def backend_for(device: torch.device) -> Optional[str]:
    """'cuda', 'simulate' (BERT_FINETUNE_CAPTURE=simulate) or None (graphs impossible here)."""
    if os.environ.get(SIMULATE_ENV, "").lower() == "simulate":
        return "simulate"
    return "cuda" if device.type == "cuda" else None


# -- whether a run can use graphs ---------------------------------------------------------------------------
def check_request(mode: str, device: torch.device) -> None:
    """--cuda_graphs on where no graph can be recorded: refused before anything is written."""
    if mode == "on" and backend_for(device) is None:
        raise UserError(f"--cuda_graphs on needs a CUDA GPU, and this process runs on {device.type}; use "
                        "--cuda_graphs auto (graphs where they pay) or off.")


def static_reason(args, accelerator, optimizer_implementation: str) -> Optional[str]:
    """Why this run's steps cannot be recorded at all, or None. Known before any step."""
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    return reason_against(args, accelerator.device, kind, accelerator.mixed_precision, optimizer_implementation)


def reason_against(args, device: torch.device, engine: str, precision: Optional[str],
                   optimizer_implementation: str) -> Optional[str]:
    """static_reason from its parts, which the runtime knows before the Accelerator exists (the launch's engine
    request, the precision asked for): the precision rule asks whether the steps will be captured."""
    if args.cuda_graphs == "off":
        return "--cuda_graphs off"
    if backend_for(device) is None:
        return f"the run is on {device.type}: CUDA graphs need a CUDA GPU"
    if engine in ("FSDP", "DEEPSPEED", "XLA", "MEGATRON_LM"):
        return f"{engine} shards or wraps the step in ways a graph cannot hold"
    if args.torch_compile:
        return "--torch_compile compiles the step instead"
    if precision == "fp16":
        return "fp16 loss scaling reads its scale on the host every step (use bf16 or no)"
    if args.skip_nonfinite:
        return "--skip_nonfinite decides on the host at every step whether to step"
    if optimizer_implementation != "adamw_torch_fused":
        return f"--optim {optimizer_implementation}: graphs need the fused AdamW (--optim auto)"
    return None


def keep_graphs(eager_ms: float, replay_ms: float, capture_s: float, steps_left: int, shapes_left: int) -> bool:
    """auto's rule: keep graphs if a replayed step is faster than an eager one (by MIN_GAIN) and the time they save
    over the steps left exceeds what recording the shapes not seen yet costs (measured per shape so far)."""
    gain_ms = eager_ms - replay_ms
    if gain_ms <= MIN_GAIN * eager_ms:
        return False
    return gain_ms / 1000 * steps_left > capture_s * shapes_left


# -- the programs ------------------------------------------------------------------------------------------
@dataclass
class Stats:
    """What results.json's setup.cuda_graphs reports."""

    mode: str
    used: bool = False
    reason: str = ""
    buckets: list = field(default_factory=list)
    train_graphs: int = 0
    eval_graphs: int = 0
    replayed_steps: int = 0
    eager_steps: int = 0
    replayed_eval_batches: int = 0
    eager_eval_batches: int = 0
    capture_seconds: float = 0.0
    calibration: Optional[dict] = None

    def as_dict(self) -> dict:
        return asdict(self) | {"capture_seconds": round(self.capture_seconds, 4)}


def shape_key(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor))


class Slot:
    """One shape's program: its static input buffers, how often it ran, and its replay once recorded."""

    def __init__(self, batch: dict):
        self.inputs = {k: torch.empty_like(v) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.seen = 0
        self.replay: Optional[Callable[[], Any]] = None
        self.failed = False

    def load(self, batch: dict) -> dict:
        for key, buf in self.inputs.items():
            buf.copy_(batch[key], non_blocking=True)
        return self.inputs


class StepGraphs:
    """The programs of one run and their graphs. Built by the Trainer when `static_reason` finds nothing against
    them; `run_window` replaces the eager forward/backward/step, `eval_outputs` the objective's evaluation call."""

    def __init__(self, objective, training, args, accelerator, meter, first_bad: torch.Tensor, stats: Stats,
                 shapes_in_data: int):
        self.objective, self.training, self.args, self.accelerator = objective, training, args, accelerator
        self.stats = stats
        self.auto = args.cuda_graphs == "auto"
        device = accelerator.device
        self.recorder = SimulatedRecorder(device) if backend_for(device) == "simulate" else CudaRecorder(device)
        # The module itself (accelerate's autocast wrapper kept): no DDP hooks, the gradients are all-reduced here.
        self.module = accelerator.unwrap_model(training.model)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        dtypes = {(p.dtype, p.device) for p in self.params}
        if len(dtypes) != 1:
            raise NotCapturable(f"the trainable parameters have {len(dtypes)} dtypes/devices; one flat gradient "
                                "buffer needs one")
        self.optimizer = getattr(training.optimizer, "optimizer", training.optimizer)  # under accelerate's wrapper
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype, device=device)
        offset = 0
        for p in self.params:  # every gradient a view of one buffer: one all-reduce, one zeroing
            p.grad = self.flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        self.make_capturable()
        f64 = dict(device=device, dtype=torch.float64)
        self.scale = torch.zeros((), **f64)        # 1 / the window's items on all processes
        self.items = torch.zeros((), **f64)        # the window's items on all processes
        self.window_loss = torch.zeros((), **f64)  # the window's summed loss on this process
        self.grad_norm = torch.zeros((), device=device, dtype=torch.float32)
        self.counter = torch.zeros((), device=device, dtype=torch.long)  # optimizer steps done
        self.meter, self.first_bad = meter, first_bad
        self.train_slots: dict[tuple, Slot] = {}
        self.eval_slots: dict[tuple, Slot] = {}
        self.step_slot = Slot({})
        self.capturing = True  # False: auto measured that graphs do not pay; the programs run eagerly
        self.train_off = False  # a training program read the device: no more training graphs
        self.eval_off = False   # ... an evaluation program did
        self.shapes_in_data = shapes_in_data  # padded shapes full training batches can take (auto's estimate)
        self._eager_timer = None  # auto: one eager window, timed
        self._replay_timers: list = []  # auto: the first fully replayed windows, timed
        self._decided = False

    # -- set-up --------------------------------------------------------------------------------
    def make_capturable(self) -> None:
        """The optimizer state on the device and the learning rate a device tensor the schedule fills (a graph
        replays the values its tensors hold, not Python numbers). Again after a checkpoint is loaded."""
        device = self.flat.device
        for group in self.optimizer.param_groups:
            if not self.recorder.simulated:
                group["capturable"] = True
            lr = group["lr"]
            if not isinstance(lr, torch.Tensor) or lr.device != device:
                group["lr"] = torch.tensor(float(lr), device=device, dtype=torch.float32)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != device and not self.recorder.simulated:
                state["step"] = step.to(device=device, dtype=torch.float32)

    def start(self, global_step: int) -> None:
        self.counter.fill_(global_step)

    # -- training ------------------------------------------------------------------------------
    def run_window(self, window: list, micro_seed: Callable[[int], int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the micro-batches of `window`: (items over all processes, summed loss here),
        device tensors the step has already added to the meter."""
        acc = self.accelerator
        items = sum(self.objective.count_items(b) for b in window).to(torch.float64)
        if acc.num_processes > 1:
            torch.distributed.all_reduce(items)
        fixed = self.training.items_per_step
        self.items.copy_(items)
        self.scale.copy_(1.0 / (items.clamp(min=1) if fixed is None else torch.full_like(items, fixed)))
        slots = [self._train_slot(b) for b in window]
        plan = self._window_plan(slots)
        timer = self.recorder.timer() if plan else None
        if timer:
            timer.start()
        replayed = True
        for i, (batch, slot) in enumerate(zip(window, slots)):
            self.meter.add_batch(batch)
            replayed &= self._run(slot, batch, self._micro, micro_seed(i), "train", plan == "eager")[1]
        if acc.num_processes > 1:  # one all-reduce of one buffer, between graphs (NCCL: no host wait)
            torch.distributed.all_reduce(self.flat)
        replayed &= self._run(self.step_slot, {}, self._step, None, "step", plan == "eager")[1]
        if timer:
            timer.stop()
            self._timed(plan, timer)
        if replayed:
            self.stats.replayed_steps += 1
        else:
            self.stats.eager_steps += 1
        self.training.scheduler.step()  # fills the learning-rate tensor for the next step
        return self.items, self.window_loss

    def _train_slot(self, batch: dict) -> Optional[Slot]:
        if self.train_off or len(batch["input_ids"]) != self.args.per_device_train_batch_size:
            return None  # an epoch's short last batch: one eager step per epoch, no graph of its own
        key = shape_key(batch)
        if key not in self.train_slots:
            self.train_slots[key] = Slot(batch)
        return self.train_slots[key]

    def _micro(self, batch: dict) -> None:
        loss = self.objective.loss_sum(self.module, batch)
        (loss * self.scale.to(loss.dtype)).backward()
        self.window_loss.add_(loss.detach().to(torch.float64))

    def _step(self, batch: dict) -> None:
        finite = torch.isfinite(self.window_loss)
        self.first_bad.copy_(torch.where((self.first_bad < 0) & ~finite, self.counter + 1, self.first_bad))
        if self.args.max_grad_norm > 0:
            self.grad_norm.copy_(torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm))
        self.training.optimizer.step()  # accelerate's wrapper: the schedule sees the step it counts
        self.flat.zero_()
        self.meter.loss.add_(self.window_loss)
        self.meter.items.add_(self.items)
        self.window_loss.zero_()
        self.counter.add_(1)

    # -- evaluation ----------------------------------------------------------------------------
    def eval_outputs(self, batch: dict, batch_size: int) -> dict:
        """The objective's eval_outputs for one batch (of the module, not a DDP wrapper: no collective inside),
        replayed where its shape was recorded."""
        slot = None
        if len(batch["input_ids"]) == batch_size and not self.eval_off:
            key = shape_key(batch)
            if key not in self.eval_slots:
                self.eval_slots[key] = Slot(batch)
            slot = self.eval_slots[key]
        out, replayed = self._run(slot, batch, lambda b: self.objective.eval_outputs(self.module, b), None, "eval")
        if replayed:  # the graph's outputs (and inputs it passes through, row ids) are rewritten by the next replay
            out = {k: v.clone() for k, v in out.items()}
            self.stats.replayed_eval_batches += 1
        else:
            self.stats.eager_eval_batches += 1
        return out

    # -- one program run: eager, recorded, or replayed -----------------------------------------
    def _run(self, slot: Optional[Slot], batch: dict, program: Callable[[dict], Any], seed: Optional[int],
             kind: str, force_eager: bool = False) -> tuple[Any, bool]:
        """(the program's outputs, whether a graph ran them)."""
        if seed is not None:
            torch.manual_seed(seed)
        if slot is None or slot.failed or not self.capturing:
            return program(batch), False
        slot.seen += 1
        if force_eager:
            return program(batch), False
        if slot.replay is not None:
            slot.load(batch)
            return slot.replay(), True
        if slot.seen == 1:  # first occurrence: eager (a warm-up), looking for host synchronisations
            with as_if_capturing():
                out, syncs = find_syncs(lambda: self.recorder.eager(lambda: program(batch)))
            if syncs:
                self._give_up(kind, syncs)
            return out, False
        inputs = slot.load(batch)
        self.recorder.synchronize()
        started = time.perf_counter()
        try:
            replay, _ = self.recorder.record(lambda: program(inputs))
        except Exception as err:  # what the detector cannot see (a library's own host call): nothing ran
            self.recorder.synchronize()
            self._give_up(kind, [f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"])
            if seed is not None:
                torch.manual_seed(seed)
            return program(batch), False
        self.recorder.synchronize()
        self.stats.capture_seconds += time.perf_counter() - started
        slot.replay = replay
        self.stats.used = True
        if kind == "eval":
            self.stats.eval_graphs += 1
        elif kind == "train":
            self.stats.train_graphs += 1
        if seed is not None:  # recording drew nothing: the replay draws what an eager run would have
            torch.manual_seed(seed)
        return replay(), True

    def _give_up(self, kind: str, syncs: list) -> None:
        """A program that cannot be recorded: its kind (training or evaluation) runs eagerly from now on."""
        slots = list(self.eval_slots.values()) if kind == "eval" else [*self.train_slots.values(), self.step_slot]
        if kind == "eval":
            self.eval_off = True
        else:
            self.train_off = True
        for slot in slots:
            slot.failed = True
        what = {"train": "a training micro-batch", "step": "the optimizer step", "eval": "an evaluation batch"}[kind]
        ops = ", ".join(sorted(set(syncs)))
        reason = f"{what} reads the device on the host ({ops})"
        self.stats.reason = f"{self.stats.reason}; {reason}" if self.stats.reason else reason
        logger.warning("--cuda_graphs: %s, so %s runs without CUDA graphs", reason,
                       "evaluation" if kind == "eval" else "training")

    # -- auto: measured ------------------------------------------------------------------------
    def _window_plan(self, slots: list) -> Optional[str]:
        """auto: "eager" for the one window timed eagerly (every program warmed up, none recorded yet), "replay"
        for the first three fully replayed windows; None otherwise (not timed)."""
        if not (self.auto and self.capturing) or self._decided:
            return None
        everything = [*slots, self.step_slot]
        if any(s is None or s.failed for s in everything):
            return None
        if self._eager_timer is None:
            return "eager" if all(s.seen >= 1 for s in everything) else None
        return "replay" if all(s.replay is not None for s in everything) else None

    def _timed(self, plan: str, timer) -> None:
        if plan == "eager":
            self._eager_timer = timer
            return
        self._replay_timers.append(timer)
        if len(self._replay_timers) < 3:
            return
        self._decided = True
        eager_ms = self._eager_timer.ms()  # the one host wait of the decision
        replay_ms = min(t.ms() for t in self._replay_timers)
        graphs = max(1, self.stats.train_graphs + 1)  # the step program's graph too
        capture_s = self.stats.capture_seconds / graphs
        steps_left = self.training.total_steps - (self.stats.replayed_steps + self.stats.eager_steps + 1)
        shapes_left = max(0, self.shapes_in_data - self.stats.train_graphs)
        keep = keep_graphs(eager_ms, replay_ms, capture_s, steps_left, shapes_left)
        self.stats.calibration = {"eager_step_ms": round(eager_ms, 3), "replayed_step_ms": round(replay_ms, 3),
                                  "capture_seconds_per_graph": round(capture_s, 4), "steps_left": steps_left,
                                  "shapes_left": shapes_left, "kept": keep}
        if keep:
            logger.info("--cuda_graphs auto: a replayed step takes %.2f ms against %.2f ms eager: graphs kept",
                        replay_ms, eager_ms)
            return
        self.capturing = False
        self.stats.reason = (f"auto measured a replayed step at {replay_ms:.2f} ms against {eager_ms:.2f} ms eager, "
                             f"too little to pay for {shapes_left} more graphs over {steps_left} steps")
        logger.info("--cuda_graphs auto: %s; the rest runs eagerly", self.stats.reason)


class NotCapturable(Exception):
    """A run whose steps cannot be recorded (the message says why); it trains eagerly."""
