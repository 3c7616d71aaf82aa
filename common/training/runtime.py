"""Runtime set-up: how many processes, on which device, in which precision.

`make_runtime` creates the Accelerator (making sure a multi-process launch really gets several
ranks) and returns it with the reason for its precision; nothing is attached to accelerate's
objects. The one private accelerate call the loop needs lives here, behind `set_sync_gradients`.
"""
from __future__ import annotations

import os
import platform
import resource
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch

from ..config import TrainArguments
from ..errors import UserError
from ..log import logger
from . import engines


@dataclass
class Runtime:
    accelerator: Any          # accelerate.Accelerator
    precision_reason: str     # why this mixed precision: "--mixed_precision", "auto: CUDA", ...


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

    xla_env = os.environ.get("ACCELERATE_USE_XLA") or os.environ.get("XRT_TPU_CONFIG")
    return bool(xla_env) and is_torch_xla_available()


def cpu_bf16_is_fast() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # pragma: no cover - older torch
        return False


def cuda_bf16_is_native() -> bool:
    """bf16 at full speed: compute capability 8.0 (Ampere) or later, or ROCm. torch.cuda.is_bf16_supported()
    also says yes on a T4 or V100 (it counts emulation), where bf16 runs far slower than fp16."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability() >= (8, 0)


# `auto` on a GPU with native bf16, eager steps: bf16 only from this many non-embedding parameters x rows per
# micro-batch. Measured point (issue 24, H200): MiniLM-L6 (10.6M) x 32 rows = 3.4e8 ran 1.4x SLOWER in bf16
# (autocast's casts added 8.7 ms of launches to a 20 ms step). The crossover is estimated where fp32 matmul time
# (~50 TFLOP/s on such short rows; 6 FLOPs per parameter and token, ~64 tokens a row) exceeds that overhead
# (bf16 ~400 TFLOP/s): 6 x 64 x work x (1/50e12 - 1/400e12) > 8.7e-3 s -> work > 1.3e9. Not measured yet:
# bench/gpu/run.sh measures MiniLM at batch 32 and 256 in both precisions to check it.
BF16_EAGER_WORK = 1.3e9


def non_embedding_parameters(config) -> Optional[int]:
    """The encoder layers' matrix parameters (attention 4 h^2, feed-forward 2 h i per layer), from a config."""
    h, layers = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not h or not layers:
        return None
    return int(layers * (4 * h * h + 2 * h * (getattr(config, "intermediate_size", None) or 4 * h)))


def resolve_precision(requested: Optional[str], device: torch.device, captured: bool = False,
                      work: Optional[Callable[[], Optional[float]]] = None) -> tuple[str, str]:
    """(mixed_precision, why). Unset -> the accelerate launcher's setting if any, else 'auto'.

    On a CUDA GPU with native bf16, auto picks bf16 for captured steps (a graph launches autocast's casts with
    everything else) and, for eager steps, only when `work()` (non-embedding parameters x rows per micro-batch)
    reaches BF16_EAGER_WORK: a small model's eager step is bound by kernel launches, which bf16 adds."""
    why = "--mixed_precision"
    if requested is None:
        env = os.environ.get("ACCELERATE_MIXED_PRECISION")
        requested, why = (env, "accelerate launch config") if env else ("auto", "auto")
    requested = requested.lower()
    kind = device.type
    if requested == "auto":
        if kind == "cuda" and not cuda_bf16_is_native():
            return "fp16", "auto: CUDA without native bf16"
        if kind == "cuda" and captured:
            return "bf16", "auto: CUDA, captured steps"
        if kind == "cuda":
            size = work() if work is not None else None
            if size is None or size >= BF16_EAGER_WORK:
                return "bf16", ("auto: CUDA, eager steps" + (f", {size:.2g} parameter-rows per micro-batch >= "
                                                            f"{BF16_EAGER_WORK:.2g}" if size else ""))
            return "no", (f"auto: CUDA, eager steps of {size:.2g} parameter-rows per micro-batch (< "
                          f"{BF16_EAGER_WORK:.2g}: launch-bound, where bf16's casts cost more than they save)")
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
    if requested == "bf16" and kind == "cuda" and not cuda_bf16_is_native():
        logger.warning("bf16 requested on a GPU before compute capability 8.0 (Ampere), where bf16 is only "
                       "emulated: it will run much slower than fp16.")
    if requested == "bf16" and kind == "cpu" and not cpu_bf16_is_fast():
        logger.warning("bf16 requested on a CPU without AVX512-BF16/AMX: it will run much slower than fp32.")
    return requested, why


def _trackers(report_to: Optional[str]):
    if report_to in ("none", "", None):
        return None
    return "all" if report_to == "all" else [t.strip() for t in report_to.split(",") if t.strip()]


def check_trackers(report_to: Optional[str]) -> None:
    """A tracker asked for must be able to start: accelerate would only warn and train without it."""
    names = _trackers(report_to)
    if names is None or names == "all":
        return
    import accelerate.utils
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(f"--report_to '{name}' is not a tracker accelerate knows; use none, all, or a comma "
                            f"list of {', '.join(LOGGER_TYPE_TO_CLASS)}.")
        if not getattr(accelerate.utils, f"is_{name}_available")():
            package = {"comet_ml": "comet-ml"}.get(name, name)
            raise UserError(f"--report_to {name}: the {name} package is not installed, so nothing would be "
                            f"tracked; `pip install {package}`, or drop --report_to.")


# Set by a launcher that started several ranks (torchrun/accelerate's multi-process launchers, notebook_launcher,
# mpirun): a process that has none of them is alone.
RANK_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _parent_file(name: str) -> Optional[bytes]:
    """/proc/<parent>/<name> (Linux), or None where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid()}/{name}", "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _parent_environ() -> Optional[dict]:
    raw = _parent_file("environ")
    if raw is None:
        return None
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if b"=" in item)
    return {key: value for key, _, value in pairs}


def _parent_argv() -> list[str]:
    raw = _parent_file("cmdline")
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] if raw else []


def _launch_flag(argv: list[str], name: str) -> Optional[str]:
    """The value of accelerate launch's --name / --name=V / --name-with-dashes in its own arguments (those before
    the training script), or None."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, arg in enumerate(argv):
        if arg.endswith(".py"):
            break
        key, eq, value = arg.partition("=")
        if key in spellings:
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _is_accelerate_launch(argv: list[str]) -> bool:
    """`accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`."""
    head = [os.path.basename(a) for a in argv[:3]]
    return ("accelerate" in head and "launch" in argv[1:4]) or "accelerate-launch" in head or any(
        a.startswith("accelerate.commands") for a in head)


def lone_launch(env, parent_env: Optional[dict], parent_argv: list[str]) -> Optional[str]:
    """Whether accelerate launch was asked for several processes (or machines) but started this process alone:
    "sure", "likely" or None.

    accelerate's single-process launcher (chosen with --cpu, or without --multi_gpu or a multi-process config)
    ignores --num_processes and num_processes in a config; all it does with a number above 1 is set MASTER_ADDR
    and MASTER_PORT for the one process it starts, beside ACCELERATE_USE_CPU ("True"/"False"), which it always
    sets. The multi-process launchers set WORLD_SIZE and the ranks instead. So: those set, no rank variable, and,
    where the parent process can be read (Linux /proc), the parent is accelerate launch and did not itself have
    these MASTER_ADDR/MASTER_PORT (a user's exported ones are not a request): "sure"; without /proc: "likely"."""
    if any(k in env for k in RANK_VARIABLES) or env.get("ACCELERATE_USE_CPU") not in ("True", "False"):
        return None
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    if parent_env is None or not parent_argv:
        return "likely"
    inherited = all(parent_env.get(k) == env[k] for k in ("MASTER_ADDR", "MASTER_PORT"))
    return "sure" if _is_accelerate_launch(parent_argv) and not inherited else None


def lone_launch_message(parent_argv: list[str], on_cpu: bool, script: str) -> str:
    """What happened, and the command that gives the processes asked for."""
    processes, machines = _launch_flag(parent_argv, "num_processes"), _launch_flag(parent_argv, "num_machines")
    if processes and processes != "1":
        asked, n, instead = f"{processes} processes (--num_processes {processes})", processes, "drop --num_processes"
    elif machines and machines != "1":
        asked, n, instead = f"{machines} machines (--num_machines {machines})", "N", "drop --num_machines"
    else:
        asked, n, instead = ("several processes (num_processes in its config)", "N",
                             "set num_processes: 1 in that config")
    flags = f"--multi_gpu{f' --num_machines {machines}' if machines and machines != '1' else ''} --num_processes {n}"
    ranks = (f"{n} CPU ranks launch `ACCELERATE_USE_CPU=1 accelerate launch {flags} {script} ...`" if on_cpu
             else f"{n} processes launch `accelerate launch {flags} {script} ...`")
    return (f"accelerate launch was asked for {asked} but started only this one: with --cpu, or without --multi_gpu "
            "or a multi-process config, it uses its single-process launcher, and this process would train alone. "
            f"For {ranks} (or `--config_file accelerate_configs/multi_gpu.yaml`{', without --cpu' if on_cpu else ''}); "
            f"for one process {instead}.")


def check_launch(on_cpu: bool) -> None:
    """Refuse a multi-process request that accelerate launch turned into one process (warn where not sure)."""
    parent_argv = _parent_argv()
    found = lone_launch(os.environ, _parent_environ(), parent_argv)
    if found is None:
        return
    import sys

    message = lone_launch_message(parent_argv, on_cpu, os.path.basename(sys.argv[0]) or "train_cls.py")
    if found == "sure":
        raise UserError(message)
    logger.warning("MASTER_ADDR/MASTER_PORT are set but this process has no rank: if %s", message)


def make_runtime(args: TrainArguments, project_dir: str, model_args=None) -> Runtime:
    """Create the Accelerator, making sure a multi-process launch really gets several ranks and that
    FSDP, DeepSpeed, XLA or a device asked for by the launch is given or refused (engines.py)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

    check_trackers(args.report_to)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    request = engines.read_request()
    on_cpu = use_cpu or not _accelerator_device_available()
    if world <= 1:
        check_launch(on_cpu)
    engines.check(request, on_cpu)  # before any process group: a refusal leaves nothing behind
    fsdp_cpu = engines.fsdp_on_cpu(request, on_cpu)
    if fsdp_cpu and "LOCAL_RANK" not in os.environ:
        raise UserError("the environment asks for FSDP (ACCELERATE_USE_FSDP=true) but this process was not started "
                        f"by a launcher; use `accelerate launch --config_file {engines.CPU_SHARDING} ...`.")
    if on_cpu and (world > 1 or fsdp_cpu):
        # accelerate sets up gloo only for cpu=True; otherwise each rank would train alone.
        use_cpu = True
    try:
        state = PartialState(cpu=use_cpu, timeout=timedelta(seconds=args.ddp_timeout))
    except Exception as err:  # rendezvous timed out or was refused
        if world <= 1:
            raise
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise UserError(f"this process (RANK={os.environ.get('RANK', '?')}) could not join the {world}-process "
                        f"group at {where} within --ddp_timeout {args.ddp_timeout} s ({type(err).__name__}); start "
                        "every rank with `accelerate launch` (or torchrun) and check "
                        "--main_process_ip/--main_process_port.") from None
    if world > 1 and state.num_processes == 1:
        raise UserError(f"the launcher started {world} processes (WORLD_SIZE={world}) but they did not join one "
                        "process group; set ACCELERATE_USE_CPU=1 or fix the accelerate config.")
    from .build import planned_optimizer
    from .capture import check_request, reason_against

    check_request(args.cuda_graphs, state.device)  # --cuda_graphs on off CUDA: refused before anything is written
    captured = reason_against(args, state.device, request.engine, (args.mixed_precision or "").lower(),
                              planned_optimizer(args, state.device)) is None
    precision, why = resolve_precision(args.mixed_precision, state.device, captured=captured,
                                       work=lambda: _work(args, model_args))
    if state.device.type == "cuda" and os.environ.get("BERT_FINETUNE_CUDNN_SDPA", "0") != "1":
        # cuDNN's attention builds a new graph for every new sequence length; with dynamic padding
        # that made bf16 training several times slower than fp32 on an H100. Flash/efficient SDPA don't.
        torch.backends.cuda.enable_cudnn_sdp(False)
    fsdp_plugin = _fsdp_plugin() if fsdp_cpu else None
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))]
    extra = {}
    if state.device.type == "cuda":
        from accelerate.utils import AutocastKwargs, DataLoaderConfiguration

        # A graph cannot hold autocast's cache of cast weights (PyTorch's CUDA graphs notes); in eager steps each
        # weight is cast once per forward anyway. Batches (pinned) go to the GPU without the host waiting.
        handlers.append(AutocastKwargs(cache_enabled=False))
        extra["dataloader_config"] = DataLoaderConfiguration(non_blocking=True)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=_trackers(args.report_to),
        project_dir=project_dir,
        rng_types=[],  # we reseed per micro-step from (seed, step); nothing to synchronise
        kwargs_handlers=handlers,
        # Dynamic shapes from the first step: batches come in a few padded lengths (and a short last
        # batch), and a static first graph would be compiled, thrown away and compiled again as dynamic
        # at the second length (measured: 22 s + 28 s on an H100 for MiniLM; now one compile).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", dynamic=True) if args.torch_compile else None,
        fsdp_plugin=fsdp_plugin,
        **extra,
    )
    if fsdp_plugin is not None:
        use_fsdp_on_cpu_ranks(accelerator, fsdp_plugin)
    return Runtime(accelerator, why)


def _work(args: TrainArguments, model_args) -> Optional[float]:
    """Non-embedding parameters x rows per micro-batch of --model (its config), or None when unknown."""
    if model_args is None:
        return None
    from .models import load_config

    params = non_embedding_parameters(load_config(model_args))
    return float(params * args.per_device_train_batch_size) if params else None


def _fsdp_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()  # every setting from the launcher's FSDP_* variables


def use_fsdp_on_cpu_ranks(accelerator, plugin) -> None:
    """Make accelerate's FSDP engine drive these CPU (gloo) ranks.

    accelerate's AcceleratorState switches to FSDP only for GPU-like distributed types (its
    `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]` branch leaves MULTI_CPU alone),
    although PyTorch's fully_shard runs on CPU over gloo. This does what that branch does: the
    distributed type becomes FSDP and the plugin (with the mixed precision policy) is attached;
    prepare, clipping, no_sync, save/load_state and get_state_dict then take accelerate's own FSDP2
    paths. tests/test_architecture.py fails if accelerate changes what this relies on."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:  # accelerate did it itself
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"FSDP on CPU ranks expected a MULTI_CPU state, got {state.distributed_type}")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def set_sync_gradients(accelerator, sync: bool) -> None:
    """Tell accelerate whether the coming backward ends an accumulation window.

    The loop drives accumulation itself (a window is a list of micro-batches it already holds), so
    it sets the flag that `accelerator.accumulate` would set: clipping and `optimizer.step` of the
    prepared optimizer act only when it is True. accelerate has no public setter; this is the one
    private call, and tests/test_units.py fails if accelerate changes it."""
    accelerator.gradient_state._set_sync_gradients(sync)


def reset_accelerate_state() -> None:
    """Allow another run in the same Python process (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def shutdown(accelerator) -> None:
    """End trackers, leave the process group and forget accelerate's singletons."""
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    reset_accelerate_state()


def peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024 if platform.system() != "Darwin" else usage / 2**20


def setup_info(runtime: Runtime) -> dict:
    """What results.json records about processes, device and precision."""
    acc = runtime.accelerator
    dev = acc.device
    kind = acc.distributed_type
    info = {"num_processes": acc.num_processes, "distributed_type": str(kind.value if hasattr(kind, "value") else kind),
            "mixed_precision": acc.mixed_precision, "precision_reason": runtime.precision_reason,
            "device": str(dev),
            "num_machines": int(os.environ.get("ACCELERATE_NUM_MACHINES", os.environ.get("GROUP_WORLD_SIZE", 1) or 1)),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


def compile_counters() -> dict:
    """torch.compile's work in this process so far (totals: a run reports the difference over its own time):
    seconds compiling (dynamo's frame and backward compiles), graphs, and hits/misses of PyTorch's on-disk caches
    (inductor's FX graph cache and AOTAutograd's cache, on by default), which spare a later run, a later seed or
    fold of one job, and a later command on this machine the inductor compile."""
    from torch._dynamo.utils import calculate_time_spent, counters

    return {"compile_seconds": float(calculate_time_spent().get("total_wall_time", 0.0)),
            "compiled_graphs": int(counters["stats"]["unique_graphs"]),
            "fx_graph_cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "fx_graph_cache_misses": int(counters["inductor"]["fxgraph_cache_miss"]),
            "autograd_cache_hits": int(counters["aot_autograd"]["autograd_cache_hit"]),
            "autograd_cache_misses": int(counters["aot_autograd"]["autograd_cache_miss"])}


def compile_report(before: dict) -> dict:
    """This run's share of compile_counters(), and where the on-disk cache lives."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    now = compile_counters()
    return {key: now[key] - before[key] for key in now} | {"cache_dir": cache_dir()}


def on_every_process(accelerator, value: bool) -> bool:
    """True when `value` holds on every process (a cache file every machine must find, or all build it together).
    Collective."""
    have = torch.tensor([1.0 if value else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        have = accelerator.gather(have)
    return bool(have.min() > 0)
