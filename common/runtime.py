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
from typing import Any, Optional

import torch

from .config import TrainArguments
from .errors import UserError
from .log import logger


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


def make_runtime(args: TrainArguments, project_dir: str) -> Runtime:
    """Create the Accelerator, making sure a multi-process launch really gets several ranks."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin

    check_trackers(args.report_to)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if world > 1 and not use_cpu and not _accelerator_device_available():
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
    precision, why = resolve_precision(args.mixed_precision, state.device)
    if state.device.type == "cuda" and os.environ.get("BERT_FINETUNE_CUDNN_SDPA", "0") != "1":
        # cuDNN's attention builds a new graph for every new sequence length; with dynamic padding
        # that made bf16 training several times slower than fp32 on an H100. Flash/efficient SDPA don't.
        torch.backends.cuda.enable_cudnn_sdp(False)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=_trackers(args.report_to),
        project_dir=project_dir,
        rng_types=[],  # we reseed per micro-step from (seed, step); nothing to synchronise
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        # Dynamic shapes from the first step: batches come in a few padded lengths (and a short last
        # batch), and a static first graph would be compiled, thrown away and compiled again as dynamic
        # at the second length (measured: 22 s + 28 s on an H100 for MiniLM; now one compile).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", dynamic=True) if args.torch_compile else None,
    )
    return Runtime(accelerator, why)


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
