"""Resumable checkpoints: accelerate's save_state plus our trainer state, written atomically.

A checkpoint is written into `checkpoints/.tmp-<name>`, its files fsynced, a `COMPLETE` marker
added, and only then renamed to `checkpoints/<name>`. `latest` is the complete checkpoint with the
largest global step *read from its trainer_state.json* (never parsed from a folder name), so a
kill while writing leaves the previous checkpoint as `latest`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Optional

from .errors import UserError

STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"


@dataclass
class TrainerState:
    global_step: int = 0            # optimizer steps taken
    epoch: int = 0                  # epoch in progress (0-based)
    batches_in_epoch: int = 0       # global micro-batches of this epoch already consumed (all processes)
    num_processes: int = 1
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0
    nonfinite_skipped: int = 0
    train_seconds: float = 0.0      # wall time of the training loop, evaluations and checkpoints included
    eval_seconds: float = 0.0       # ... of which evaluating during training
    checkpoint_seconds: float = 0.0  # ... of which writing checkpoints
    samples_seen: int = 0
    tokens_seen: int = 0            # real (non-padding) training tokens, all processes
    padded_tokens_seen: int = 0     # training tokens including padding, all processes
    kind: str = "periodic"          # "periodic" | "best" | "preempted"
    identity: dict = field(default_factory=dict)  # model/task/labels: refuse resuming into a different run
    scheduler: dict = field(default_factory=dict)  # LR scheduler position (JSON, no pickle)
    initial_eval: dict = field(default_factory=dict)  # metrics of the weights before training (if measured)
    state_format: str = ""          # how save_state laid out model/optimizer: "" (plain) or "FSDP <state dict type>"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: str) -> "TrainerState":
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def state_format(accelerator) -> str:
    """How accelerate's save_state lays out the model and optimizer, which a resume must match: ""
    (one process or DDP: full tensors) or "FSDP FULL_STATE_DICT" / "FSDP SHARDED_STATE_DICT"."""
    if accelerator.distributed_type == "FSDP":
        return "FSDP " + str(accelerator.state.fsdp_plugin.state_dict_type).split(".")[-1]
    return ""


def describe_format(fmt: str) -> str:
    return fmt or "plain (one process or DDP)"


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def save_checkpoint(accelerator, ckpt_root: str, name: str, state: TrainerState) -> str:
    """Collective: every process calls it. Returns the final folder."""
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}")
    if accelerator.is_main_process:
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
                fh.write(state.to_json())
            _fsync_tree(tmp)
            with open(os.path.join(tmp, COMPLETE), "w") as fh:
                fh.write("ok\n")
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as err:  # disk full, quota, permissions: the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(ckpt_root)
        keep = f"the newest complete one, {previous[-1][1]}, is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"could not write checkpoint '{final}' ({err.strerror or err}); {keep}. Free space "
                        "and rerun with --resume_from_checkpoint latest.") from None
    if accelerator.is_main_process:
        if os.path.exists(final):
            old = os.path.join(ckpt_root, f".old-{name}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(ckpt_root)
    accelerator.wait_for_everyone()
    return final


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE)) and os.path.isfile(os.path.join(path, STATE_FILE))


def list_checkpoints(ckpt_root: str, kinds=("periodic", "preempted")) -> list[tuple[int, str]]:
    """Complete checkpoints of the given kinds as (global_step, path), oldest first."""
    found = []
    if not os.path.isdir(ckpt_root):
        return found
    for name in os.listdir(ckpt_root):
        path = os.path.join(ckpt_root, name)
        if name.startswith(".") or not os.path.isdir(path) or not is_complete(path):
            continue
        try:
            state = TrainerState.from_file(os.path.join(path, STATE_FILE))
        except (OSError, ValueError, TypeError):
            continue
        if state.kind in kinds:
            found.append((state.global_step, path))
    return sorted(found)


def resolve_resume(spec: Optional[str], ckpt_root: str) -> Optional[str]:
    """'latest' -> newest complete checkpoint (None if there is none); a path -> checked path."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(ckpt_root)
        return found[-1][1] if found else None
    if not os.path.isdir(spec):
        raise UserError(f"--resume_from_checkpoint '{spec}' does not exist; pass a checkpoint folder or 'latest'.")
    if not is_complete(spec):
        raise UserError(f"--resume_from_checkpoint '{spec}' is not a complete checkpoint "
                        f"(no {COMPLETE} marker or {STATE_FILE}); pick another one or 'latest'.")
    return spec


def rotate(ckpt_root: str, keep: Optional[int]) -> None:
    if not keep:
        return
    found = list_checkpoints(ckpt_root)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
