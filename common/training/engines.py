"""What the launch asked for beyond plain data parallelism, and whether this machine can give it.

`accelerate launch` tells the script its setup through environment variables: ACCELERATE_USE_FSDP
and FSDP_* for `distributed_type: FSDP`, ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_* for
DeepSpeed. accelerate itself drops some of these requests without a word when no GPU is present:
with CPU ranks (`cpu=True`, the only way it joins CPU processes over gloo) its AcceleratorState
turns FSDP on only for GPU-like distributed types and DeepSpeed only when `not cpu`, so both used to
become plain DDP. `read_request` reads what was asked for and `check` refuses, in one sentence and
before any process group or file exists, what cannot run here. FSDP2 (`fully_shard`) does run on CPU
ranks over gloo: runtime.py then sets accelerate's FSDP engine up on them (`fsdp_on_cpu`).

A device can be insisted on with accelerate's own ACCELERATE_TORCH_DEVICE (e.g. `mps`, `cuda`) or
the older launchers' ACCELERATE_USE_MPS_DEVICE=true; without them a one-process config uses whatever
device the machine has. XLA is asked for with PJRT_DEVICE or XRT_TPU_CONFIG (torch_xla's variables).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ..errors import UserError

CPU_SHARDING = "accelerate_configs/fsdp.yaml"   # sharding that runs on CPU ranks
CPU_DDP = "accelerate_configs/multi_gpu.yaml"   # plain DDP, CPU ranks over gloo without GPUs
CPU_ONE = "accelerate_configs/cpu.yaml"         # one process on the CPU


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Request:
    engine: str = ""                   # "FSDP", "DEEPSPEED", "XLA" or "" (one process / plain DDP)
    fsdp_version: int = 2
    fsdp_offload_params: bool = False
    zero_stage: Optional[str] = None   # DeepSpeed ZeRO stage, as the launcher passed it
    xla_variable: str = ""             # the variable that asked for XLA, as NAME=value
    device: str = ""                   # a device type the launch insists on ("mps", "cuda", ...)
    device_variable: str = ""          # ... and the variable that said so, as NAME=value


def read_request(env: Mapping[str, str] = os.environ) -> Request:
    """The launch's request, from the variables accelerate launch (or the user) set."""
    device, device_variable = "", ""
    if env.get("ACCELERATE_TORCH_DEVICE"):
        device_variable = f"ACCELERATE_TORCH_DEVICE={env['ACCELERATE_TORCH_DEVICE']}"
        device = env["ACCELERATE_TORCH_DEVICE"].split(":")[0].strip().lower()
    elif _flag(env, "ACCELERATE_USE_MPS_DEVICE"):
        device, device_variable = "mps", f"ACCELERATE_USE_MPS_DEVICE={env['ACCELERATE_USE_MPS_DEVICE']}"
    common = {"device": device, "device_variable": device_variable}
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return Request("DEEPSPEED", zero_stage=env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), **common)
    if _flag(env, "ACCELERATE_USE_FSDP"):
        version = env.get("FSDP_VERSION", "1").strip() or "1"
        return Request("FSDP", fsdp_version=int(version) if version.isdigit() else 1,
                       fsdp_offload_params=_flag(env, "FSDP_OFFLOAD_PARAMS"), **common)
    for name in ("PJRT_DEVICE", "XRT_TPU_CONFIG"):
        if env.get(name):
            return Request("XLA", xla_variable=f"{name}={env[name]}", **common)
    return Request(**common)


def device_available(kind: str) -> bool:
    """Whether this machine has a device of this type (without initialising CUDA)."""
    if kind == "cpu":
        return True
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if kind == "cuda":
        return torch.cuda.is_available()
    module = getattr(torch, kind, None)
    try:
        return bool(module is not None and module.is_available())
    except Exception:  # pragma: no cover - exotic backends
        return False


def _deepspeed_installed() -> bool:
    from accelerate.utils import is_deepspeed_available

    return is_deepspeed_available()


def check(request: Request, on_cpu: bool) -> None:
    """Refuse, in one sentence, a request this machine cannot give; `on_cpu`: the ranks train on the CPU."""
    if request.device and not device_available(request.device):
        name = {"mps": "an Apple MPS", "cuda": "a CUDA"}.get(request.device, f"a '{request.device}'")
        raise UserError(f"the launch asks for {name} device ({request.device_variable}) but this machine has none; "
                        f"unset it and launch with {CPU_ONE} (or {CPU_DDP} for several CPU processes) to train on "
                        "the CPU.")
    if request.engine == "DEEPSPEED":
        zero = f" ZeRO-{request.zero_stage}" if request.zero_stage else ""
        if on_cpu:
            raise UserError(f"the accelerate config asks for DeepSpeed{zero} (distributed_type: DEEPSPEED), which "
                            "needs GPUs, and these processes run on the CPU (no GPU here, or use_cpu); for sharded "
                            f"training on CPU ranks launch with {CPU_SHARDING} (or {CPU_DDP} for plain DDP).")
        if not _deepspeed_installed():
            raise UserError(f"the accelerate config asks for DeepSpeed{zero} (distributed_type: DEEPSPEED) but the "
                            "deepspeed package is not installed; `pip install deepspeed` (see docs/distributed.md) "
                            f"or launch with {CPU_SHARDING} for PyTorch's FSDP.")
    if request.engine == "XLA":
        from accelerate.utils import is_torch_xla_available

        if not is_torch_xla_available():
            raise UserError(f"the launch asks for XLA ({request.xla_variable}) but torch_xla is not installed here; "
                            "install torch_xla on the TPU machine (see accelerate_configs/tpu.yaml), or unset "
                            f"{request.xla_variable.split('=')[0]} and launch with {CPU_ONE}.")
    if request.engine == "FSDP" and on_cpu:
        if request.fsdp_version != 2:
            # FSDP1 computes on "a CUDA or CUDA-like device" (torch/distributed/fsdp/_init_utils.py
            # _get_compute_device); accelerate's plugin refuses sync_module_states without one.
            raise UserError(f"the accelerate config asks for FSDP version {request.fsdp_version} (fsdp_version: "
                            f"{request.fsdp_version}), which PyTorch runs only on GPU-like devices, and these "
                            f"processes run on the CPU; set fsdp_version: 2 (fully_shard) as {CPU_SHARDING} does.")
        if request.fsdp_offload_params:
            # fully_shard pins the offloaded shards for copies to the GPU (_fsdp_param.py, pin_memory()).
            raise UserError("the accelerate config asks FSDP to offload parameters (fsdp_offload_params: true), which "
                            "pins them in page-locked memory for a GPU and fails without one, and these processes "
                            f"already keep their shards in CPU RAM; set fsdp_offload_params: false as {CPU_SHARDING} "
                            "does.")


def fsdp_on_cpu(request: Request, on_cpu: bool) -> bool:
    """FSDP asked for where accelerate would silently fall back to DDP: runtime.py sets it up on CPU ranks."""
    return request.engine == "FSDP" and on_cpu
