"""Resumable checkpoints, written atomically, with nothing pickled, and checked before a resume writes anything.

A checkpoint is written into `checkpoints/.tmp-<name>`, its files fsynced, a `COMPLETE` marker
added, and only then renamed to `checkpoints/<name>`. `latest` is the complete checkpoint with the
largest global step *read from its trainer_state.json* (never parsed from a folder name), so a
kill while writing leaves the previous checkpoint as `latest`; with no checkpoint at all `latest` is
refused and `auto` starts from scratch.

What a checkpoint holds (the "safetensors" layout; one process, DDP and the other data-parallel setups):
`model.safetensors` (the weights), `optimizer.safetensors` (AdamW's moments, its param groups as JSON in
the header), `scaler.json` (the fp16 loss scale, if any), `trainer_state.json` (counters, schedule, the run's
identity, this format's name), `log_history.jsonl` (the run's log records up to this step, so a resumed run's
log starts with them wherever it is written) and `COMPLETE`. Random-number states are not needed: every
micro-batch reseeds from (seed, step). Under FSDP, DeepSpeed, XLA or Megatron the sharded model and optimizer
are written by accelerate's `save_state` instead (the "accelerate" layout: torch.save files, read back by
accelerate with torch.load(weights_only=True); DeepSpeed reads its own) -- resume those only from folders you wrote.

`check_checkpoint` runs before a resumed run writes anything: the folder must be a complete checkpoint
written by these scripts in this layout, of the same run (model, task, labels, ...), hold no file these
scripts never write (a planted pickle is refused, never opened), and its tensors must fit the model and
the optimizer (safetensors headers read, shapes compared).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import UserError, closest
from ..files import honour_umask_tree
from ..log import logger

STATE_FILE = "trainer_state.json"
COMPLETE = "COMPLETE"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCALER_FILE = "scaler.json"
HISTORY_FILE = "log_history.jsonl"  # the same name and format as the output folder's log
RESUME_KEYWORDS = ("latest", "auto")  # --resume_from_checkpoint values that are not folders
FORMAT = "bert-finetune checkpoint 2"  # in trainer_state.json; older or foreign checkpoints lack it
SHARDED = ("FSDP", "DEEPSPEED", "XLA", "MEGATRON_LM")  # distributed types whose state accelerate writes


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
    format: str = ""                # FORMAT when written by these scripts
    layout: str = "safetensors"     # "safetensors" (model/optimizer files of our own) or "accelerate" (sharded)
    state_format: str = ""          # how the model/optimizer state is cut: "" (plain) or "FSDP <state dict type>"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_file(cls, path: str) -> "TrainerState":
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        state = cls(**known)
        for f in cls.__dataclass_fields__.values():  # the types the loop relies on
            value, default = getattr(state, f.name), getattr(cls(), f.name)
            if default is not None and not isinstance(value, type(default)) and not (
                    isinstance(default, float) and isinstance(value, int)):
                raise ValueError(f"'{f.name}' is {value!r}")
        return state


@dataclass
class Checked:
    """A checkpoint that check_checkpoint accepted: its folder, its trainer state and the log records up to its step
    (all sessions; empty when neither the checkpoint nor its output folder kept them)."""
    path: str
    state: TrainerState
    history: list = field(default_factory=list)


def layout_of(accelerator) -> str:
    kind = accelerator.distributed_type
    return "accelerate" if str(getattr(kind, "value", kind)) in SHARDED else "safetensors"


def state_format(accelerator) -> str:
    """How the model and optimizer state is cut, which a resume must match: "" (one process or DDP: full
    tensors) or "FSDP FULL_STATE_DICT" / "FSDP SHARDED_STATE_DICT"."""
    if accelerator.distributed_type == "FSDP":
        return "FSDP " + str(accelerator.state.fsdp_plugin.state_dict_type).split(".")[-1]
    return ""


def describe_format(fmt: str) -> str:
    return fmt or "plain (one process or DDP)"


def _unwrap(accelerator, model):
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def plain(value):
    """JSON-ready: tensors (a learning rate the schedule fills in a device tensor, --cuda_graphs) as numbers."""
    if hasattr(value, "detach"):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def write_state(accelerator, model, optimizer, folder: str) -> None:
    """Collective: the model, optimizer (and fp16 scaler) state into `folder`, without pickle (main process), or
    through accelerate for sharded setups (every process; their random-state pickles are removed, unused).
    `optimizer` None (the best weights, which are only ever read back as weights): the model alone, plain layout."""
    if layout_of(accelerator) == "accelerate":
        accelerator.save_state(folder)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name in os.listdir(folder):
                if name.startswith("random_states_") and name.endswith(".pkl"):
                    os.unlink(os.path.join(folder, name))
        return
    from safetensors.torch import save_file, save_model

    if accelerator.is_main_process:
        save_model(_unwrap(accelerator, model), os.path.join(folder, MODEL_FILE), metadata={"format": "pt"})
    if accelerator.is_main_process and optimizer is not None:
        state = optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, values in state["state"].items():
            for key, value in values.items():
                if hasattr(value, "detach"):
                    tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        save_file(tensors, os.path.join(folder, OPTIMIZER_FILE), metadata={
            "format": FORMAT, "param_groups": json.dumps(plain(state["param_groups"])), "scalars": json.dumps(scalars)})
        if accelerator.scaler is not None:
            with open(os.path.join(folder, SCALER_FILE), "w", encoding="utf-8") as fh:
                json.dump(accelerator.scaler.state_dict(), fh)
    accelerator.wait_for_everyone()


def read_state(accelerator, model, optimizer, folder: str) -> None:
    """Collective: load what write_state wrote (every process; optimizer None: the weights only)."""
    if layout_of(accelerator) == "accelerate":
        accelerator.load_state(folder)
        return
    from safetensors import safe_open
    from safetensors.torch import load_model

    load_model(_unwrap(accelerator, model), os.path.join(folder, MODEL_FILE), strict=True)
    if optimizer is not None:
        with safe_open(os.path.join(folder, OPTIMIZER_FILE), framework="pt") as fh:
            meta = fh.metadata()
            state: dict = {}
            for key in fh.keys():
                pid, name = key.split(".", 1)
                state.setdefault(int(pid), {})[name] = fh.get_tensor(key)
        for key, value in json.loads(meta["scalars"]).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in json.loads(meta["param_groups"])]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        scaler = os.path.join(folder, SCALER_FILE)
        if accelerator.scaler is not None and os.path.isfile(scaler):
            with open(scaler, encoding="utf-8") as fh:
                accelerator.scaler.load_state_dict(json.load(fh))


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


def save_checkpoint(accelerator, model, optimizer, ckpt_root: str, name: str, state: TrainerState,
                    history: Optional[list] = None) -> str:
    """Collective: every process calls it. `history`: the run's log records so far, kept with the state so that a
    resumed run's log_history.jsonl carries them. Returns the final folder."""
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}")
    if accelerator.is_main_process:
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        write_state(accelerator, model, optimizer, tmp)
        state.format, state.layout = FORMAT, layout_of(accelerator)
        if accelerator.is_main_process:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
                fh.write(state.to_json())
            if history is not None:
                with open(os.path.join(tmp, HISTORY_FILE), "w", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(_finite(r), allow_nan=False) + "\n" for r in history)
            honour_umask_tree(tmp)  # safetensors files are written with mode 0600
            _fsync_tree(tmp)
            with open(os.path.join(tmp, COMPLETE), "w") as fh:
                fh.write("ok\n")
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as err:  # disk full, quota, permissions: the previous checkpoints stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(ckpt_root)
        keep = (f"the newest complete one, {previous[-1][1]}, is intact. Free space and rerun with "
                "--resume_from_checkpoint latest" if previous else "no earlier checkpoint exists. Free space and "
                "rerun with --resume_from_checkpoint auto (it starts from scratch when there is no checkpoint)")
        raise UserError(f"could not write checkpoint '{final}' ({err.strerror or err}); {keep}.") from None
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
    """The checkpoint folder to resume from, or None to start from scratch.

    'latest' -> the newest readable complete checkpoint in `ckpt_root`; an error when there is none (a resume asked
    for must not quietly become a new run). 'auto' -> the same, or None when there is no checkpoint at all (one
    command for a first run and its restarts). Both refuse when checkpoints exist but none can be read. A path ->
    that folder, if it is a complete checkpoint."""
    if not spec:
        return None
    if spec in RESUME_KEYWORDS:
        found = list_checkpoints(ckpt_root)
        complete = [os.path.join(ckpt_root, n) for n in sorted(os.listdir(ckpt_root)) if not n.startswith(".")
                    and is_complete(os.path.join(ckpt_root, n))] if os.path.isdir(ckpt_root) else []
        unreadable = [p for p in complete if p not in {path for _, path in found} and _read_error(p)]
        if not found and unreadable:
            raise UserError(f"--resume_from_checkpoint {spec}: no checkpoint in '{ckpt_root}' can be read "
                            f"({os.path.basename(unreadable[0])}: {_read_error(unreadable[0])}); pass "
                            "--overwrite_output_dir to start again, or a checkpoint folder.")
        for path in unreadable:
            logger.warning("skipped checkpoint %s: %s", path, _read_error(path))
        if not found and spec == "latest":
            raise UserError(f"--resume_from_checkpoint latest: there is no complete checkpoint in '{ckpt_root}' to "
                            "resume; pass --resume_from_checkpoint auto to resume when there is one and start from "
                            "scratch otherwise, a checkpoint folder, or drop the flag.")
        return found[-1][1] if found else None
    if not os.path.isdir(spec):
        raise UserError(f"--resume_from_checkpoint '{spec}' does not exist{closest(spec, RESUME_KEYWORDS)}; pass a "
                        "checkpoint folder, 'latest' or 'auto'.")
    if not is_complete(spec):
        raise UserError(f"--resume_from_checkpoint '{spec}' is not a complete checkpoint "
                        f"(no {COMPLETE} marker or {STATE_FILE}); pick another one or 'latest'.")
    return spec


def _read_error(path: str) -> Optional[str]:
    """Why a checkpoint's trainer_state.json cannot be used (None if it can)."""
    try:
        TrainerState.from_file(os.path.join(path, STATE_FILE))
    except (OSError, ValueError, TypeError) as err:
        return f"{STATE_FILE} is unreadable ({' '.join(str(err).split())[:120]})"
    return None


def check_checkpoint(path: str, identity: dict, accelerator, model, optimizer) -> Checked:
    """Everything that can be known about resuming from `path` without loading it, before anything is written:
    its trainer state reads, it was written by these scripts in this setup's layout for the same run, it holds
    no file these scripts never write, its tensors fit the model and the optimizer, and its log history reads.
    Returns its state and log history."""
    where = f"--resume_from_checkpoint '{path}'"
    try:
        saved = TrainerState.from_file(os.path.join(path, STATE_FILE))
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{where}: {STATE_FILE} is unreadable ({' '.join(str(err).split())[:120]}); the checkpoint "
                        "is damaged, resume from another one.") from None
    if saved.format != FORMAT:
        raise UserError(f"{where} was not written by this version of these scripts (its {STATE_FILE} does not name "
                        f"the format '{FORMAT}'); resume only from checkpoints they wrote, or start a new run.")
    for key, value in identity.items():
        if key in saved.identity and json.dumps(saved.identity[key]) != json.dumps(value):
            raise UserError(f"{where} belongs to a different run ({key} is {saved.identity[key]!r} there, {value!r} "
                            "now); resume with the same settings or start a new output_dir.")
    expected = state_format(accelerator)
    if saved.state_format != expected:
        raise UserError(f"{where} holds {describe_format(saved.state_format)} state and this run expects "
                        f"{describe_format(expected)}; resume it with the accelerate config that wrote it (the number "
                        "of processes may differ).")
    layout = layout_of(accelerator)
    if saved.layout != layout:
        raise UserError(f"{where} was written in the '{saved.layout}' layout, but this setup writes '{layout}' "
                        "(FSDP/DeepSpeed/XLA or not); resume with the accelerate config it was trained with.")
    if layout == "safetensors":
        _check_files(path, where, accelerator, model, optimizer)
    return Checked(path, saved, read_history(path, saved.global_step))


def read_history(path: str, step: int) -> list:
    """The log records of the run up to `step` that a resumed run's log starts with: the checkpoint's own
    log_history.jsonl, or (a checkpoint written before it kept one) the rows of the log_history.jsonl of the output
    folder holding it. A damaged history of the checkpoint's own is refused."""
    own = os.path.join(path, HISTORY_FILE)
    source = own if os.path.isfile(own) else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))),
                                                           HISTORY_FILE)
    if not os.path.isfile(source):
        return []
    records = []
    try:
        with open(source, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError(f"line {number} is not a log record with a step")
                records.append(record)
    except (OSError, ValueError) as err:
        if source != own:  # the output folder's log is not part of the checkpoint: resume without it
            logger.warning("%s cannot be read (%s): the resumed log starts at step %d", source, err, step)
            return []
        raise UserError(f"--resume_from_checkpoint '{path}': its {HISTORY_FILE} is unreadable "
                        f"({' '.join(str(err).split())[:120]}); delete that file to resume without the earlier log "
                        "records, or resume from another checkpoint.") from None
    return [r for r in records if r["step"] <= step]


def _finite(record: dict) -> dict:
    """A log record as strict JSON: NaN/inf -> None (as in the output folder's log)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _check_files(path: str, where: str, accelerator, model, optimizer) -> None:
    from safetensors import safe_open

    allowed = {STATE_FILE, COMPLETE, MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE, HISTORY_FILE}
    present = set(os.listdir(path))
    foreign = sorted(present - allowed)
    if foreign:
        raise UserError(f"{where} holds files these scripts never write ({', '.join(foreign[:4])}): it was not written "
                        "by them or was changed since; it is not opened. Resume from a checkpoint they wrote.")
    if MODEL_FILE in present and OPTIMIZER_FILE not in present and os.path.basename(os.path.normpath(path)) == "best":
        raise UserError(f"{where} holds the best weights only, without the optimizer state a resume needs; resume "
                        "from a step_N checkpoint (--resume_from_checkpoint latest), or start a new run from these "
                        "weights with --model.")
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        if name not in present:
            raise UserError(f"{where} has no {name}; the checkpoint is incomplete, resume from another one.")
    state_dict = _unwrap(accelerator, model).state_dict()
    try:
        with safe_open(os.path.join(path, MODEL_FILE), framework="pt") as fh:
            stored = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        with safe_open(os.path.join(path, OPTIMIZER_FILE), framework="pt") as fh:
            meta = fh.metadata() or {}
            moments = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        groups = json.loads(meta["param_groups"])
        json.loads(meta["scalars"])
    except Exception as err:  # a damaged safetensors header or metadata
        raise UserError(f"{where}: its weights or optimizer state cannot be read ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:150]}); the checkpoint is damaged, resume from another "
                        "one.") from None
    storage = {k: v.untyped_storage().data_ptr() for k, v in state_dict.items()}
    saved_storage = {storage[k] for k in stored if k in storage}
    wrong = [k for k, shape in stored.items() if k not in state_dict or tuple(state_dict[k].shape) != shape]
    wrong += [k for k in state_dict if k not in stored and storage[k] not in saved_storage]  # tied weights: saved once
    if wrong:
        raise UserError(f"{where} holds weights that do not fit this model (e.g. '{wrong[0]}'); resume with the "
                        "--model and settings it was trained with.")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        fits = [len(g["params"]) for g in groups] == [len(g["params"]) for g in optimizer.param_groups]
        for key, shape in moments.items():
            pid = int(key.split(".", 1)[0])
            fits = fits and pid < len(params) and (shape == () or shape == tuple(params[pid].shape))
    except (ValueError, TypeError, KeyError):
        fits = False
    if not fits:
        raise UserError(f"{where} holds an optimizer state that does not fit this model's parameters; resume with the "
                        "--model and settings it was trained with.")


def rotate(ckpt_root: str, keep: Optional[int]) -> None:
    if not keep:
        return
    found = list_checkpoints(ckpt_root)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
