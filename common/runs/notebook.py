"""How many processes a notebook launch needs and in which precision, found from the device without
initialising CUDA in the kernel (`notebook_launcher` refuses to fork from a kernel that has).

`examples/colab_quickstart.ipynb` prints `launch_settings().line` and passes `num_processes` and
`mixed_precision` to `notebook_launcher`, and the same precision to the script as `--mixed_precision`:
the launcher hands its own `mixed_precision` to the scripts (ACCELERATE_MIXED_PRECISION) only when it
starts several GPU or CPU processes; with one GPU it calls the function in the kernel and on a TPU it
spawns torch_xla's processes, both with no precision set.

GPUs are read with `nvidia-smi` (name and compute capability; torch would have to initialise CUDA for
the capability): compute capability 8.0 (Ampere) and later -> bf16, 6.x-7.x (P100, V100, T4) -> fp16
(bf16 there is emulated, far slower), older -> no. A TPU is found from the variables Colab, Kaggle and
TPU VMs set; torch_xla starts one process per TPU core itself, in bf16. Nothing else: one CPU process.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from ..errors import UserError

SMI_FIELDS = "index,uuid,name,compute_cap"
# Variables that mean a TPU runtime: notebook_launcher's own TPU test reads the first two.
TPU_VARIABLES = ("TPU_NAME", "PJRT_DEVICE", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "XRT_TPU_CONFIG")


@dataclass(frozen=True)
class Gpu:
    index: str
    uuid: str
    name: str
    capability: Optional[tuple[int, int]]  # None: this nvidia-smi cannot report it


@dataclass(frozen=True)
class LaunchSettings:
    num_processes: int
    mixed_precision: str                              # no, fp16 or bf16: what notebook_launcher accepts
    line: str                                         # one line for the notebook: what was chosen and why
    env: dict[str, str] = field(default_factory=dict)  # to set before notebook_launcher (its TPU test)


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `nvidia-smi --query-gpu=index,uuid,name[,compute_cap] --format=csv,noheader`."""
    gpus = []
    for row in text.strip().splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) < 3:
            continue
        cap = re.fullmatch(r"(\d+)\.(\d+)", parts[3]) if len(parts) > 3 else None
        gpus.append(Gpu(parts[0], parts[1], parts[2], (int(cap[1]), int(cap[2])) if cap else None))
    return gpus


def run_nvidia_smi() -> tuple[Optional[str], str]:
    """(nvidia-smi's rows, "") or (None, why it gave none). Drivers older than 510 have no compute_cap
    field: they are asked again without it."""
    why = ""
    for fields in (SMI_FIELDS, SMI_FIELDS.rsplit(",", 1)[0]):
        try:
            proc = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:
            return None, f"nvidia-smi did not run ({type(err).__name__})"
        if proc.returncode == 0:
            return proc.stdout, ""
        said = (proc.stdout + proc.stderr).strip().splitlines()
        why = f"nvidia-smi failed: {said[-1] if said else f'exit code {proc.returncode}'}"
    return None, why


def visible(gpus: list[Gpu], env: Mapping[str, str]) -> Optional[list[Gpu]]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves (indices or GPU-UUID prefixes), or None when it names
    devices nvidia-smi does not list (MIG instances): then only torch can count them."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return gpus
    wanted = [w.strip() for w in value.split(",") if w.strip()]
    if not wanted or wanted[0].startswith("-"):
        return []
    chosen = [g for w in wanted for g in gpus if w == g.index or (w.startswith("GPU-") and g.uuid.startswith(w))]
    return chosen if len(chosen) == len(wanted) else None


def _torch_gpu_count() -> int:
    """torch's count reads NVML first, so it initialises no CUDA (torch.cuda.device_count's note)."""
    import torch

    return torch.cuda.device_count()


def tpu_cores(accelerator_type: str) -> Optional[int]:
    """Devices (one process each) on one TPU host: v2-8/v3-8 name TensorCores (8), v4-8/v5p-8
    TensorCores of which each chip's two make one device (4), v5e/v5litepod/v6e name chips (8)."""
    match = re.fullmatch(r"v(\d+)([a-z]*)-(\d+)", accelerator_type.strip().lower())
    if not match:
        return None
    gen, kind, n = int(match[1]), match[2], int(match[3])
    return min(n // 2 if gen == 4 or kind == "p" else n, 8)


def _precision(capability: Optional[tuple[int, int]]) -> tuple[str, str]:
    """(mixed precision, why) for the least capable GPU."""
    if capability is None:
        return "fp16", "fp16 (compute capability unknown; every GPU since 6.0 runs fp16: set bf16 on an A100/H100/L4)"
    cc = f"compute capability {capability[0]}.{capability[1]}"
    if capability >= (8, 0):
        return "bf16", f"bf16 ({cc}: Ampere or later)"
    if capability >= (6, 0):
        return "fp16", f"fp16 ({cc}: bf16 only from 8.0, Ampere)"
    return "no", f"no ({cc}: too old for fast fp16)"


def launch_settings(env: Optional[Mapping[str, str]] = None, smi_output: Optional[str] = None,
                    gpu_count: Callable[[], int] = _torch_gpu_count,
                    xla_installed: Optional[bool] = None) -> LaunchSettings:
    """Processes and precision for `notebook_launcher` on this machine. `smi_output` (nvidia-smi's rows),
    `env`, `gpu_count` and `xla_installed` are looked up when not given (tests pass them)."""
    env = os.environ if env is None else env
    why_not = ""
    if smi_output is None:
        smi_output, why_not = run_nvidia_smi()
    gpus = None if smi_output is None else visible(parse_nvidia_smi(smi_output), env)
    if gpus is None:  # no nvidia-smi, or devices it cannot name: count only, capability unknown
        count = gpu_count()
        gpus = [Gpu(str(i), "", "GPU", None) for i in range(count)]
        why_not = f" ({why_not})" if why_not and count else ""
    if gpus:
        caps = [g.capability for g in gpus]
        precision, why = _precision(None if None in caps else min(caps))
        names = sorted({g.name for g in gpus})
        n = len(gpus)
        return LaunchSettings(n, precision, f"{n} process{'es' if n > 1 else ''} on {n} x {' + '.join(names)}, "
                                            f"mixed precision {why}{why_not}")
    tpu = next((f"{name}={env[name]}" for name in TPU_VARIABLES
                if env.get(name) and (name != "PJRT_DEVICE" or env[name].upper() == "TPU")), None)
    if tpu:
        if xla_installed is None:
            xla_installed = importlib.util.find_spec("torch_xla") is not None
        if not xla_installed:
            raise UserError(f"this is a TPU runtime ({tpu}) but torch_xla is not installed; install the torch_xla "
                            "build matching your torch (`pip install torch_xla[tpu]`), or switch the runtime to a GPU.")
        kind = env.get("TPU_ACCELERATOR_TYPE", "")
        cores = tpu_cores(kind)
        n = cores or 8
        where = f"a {kind}" if cores else "a v2-8/v3-8 (assumed)"
        # notebook_launcher takes the TPU path only when it sees TPU_NAME or PJRT_DEVICE=TPU
        extra = {} if env.get("TPU_NAME") or env.get("PJRT_DEVICE", "").upper() == "TPU" else {"PJRT_DEVICE": "TPU"}
        return LaunchSettings(n, "bf16", f"TPU ({tpu}): {n} processes, one per core of {where}, started by "
                                         "torch_xla; mixed precision bf16", extra)
    return LaunchSettings(1, "no", "no GPU or TPU: 1 process on the CPU, mixed precision no")
