"""Knowledge distillation: a student trained from a fine-tuned teacher's predictions and, TinyBERT-style, from
its intermediate layers (docs/distillation.md).

`setup` (called by single_run.prepare_run when --teacher_model is given, before any file is written) checks the
teacher against the student -- engine, the task's head, label maps, vocabulary, layer map, attention heads --
and wraps the task's Objective in a `DistillObjective`; the loop sees an Objective like any other.

The loss of a micro-batch is a sum over its items (what the task's loss averages over, `Objective.distill_mask`:
examples for classification, labelled positions for NER), so the loop's division by the items of the whole
window on every process keeps it exact for any accumulation and process count:

    alpha * CE(hard labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    + w * sum over examples of (the example's items) x (its intermediate-layer MSEs)

where an example's MSE is the mean over its real tokens (hidden states, embeddings: squared error per hidden
unit) or its real query-key pairs (attention scores q.k/sqrt(d) of every head, before mask and softmax).

Teacher cost. With the prediction layer alone the teacher's outputs are deterministic: its logits are computed
once over the training set (each process scores its share, gathered), cached on disk under a key of the
teacher's files and the tokenized training data, and looked up by each batch's `example_index`, so an epoch
costs what plain fine-tuning costs. With intermediate losses the teacher runs at every step under
inference_mode and the run's autocast; it is never given to accelerator.prepare (no DDP wrapper, gradients or
optimizer state). A learned projection (student width -> teacher width) is registered on the student as
`distill_projection` when the widths differ: the optimizer trains it, checkpoints hold it (exact resume), and
`state_for_saving` keeps it out of the saved model.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import progress
from ..config import parse_layer_map
from ..errors import UserError
from ..files import honour_umask
from ..log import logger
from ..task import Objective, model_inputs
from . import transfer
from .build import lengths
from .models import encoder_layers, load_config, load_pretrained, load_tokenizer, model_fingerprint
from .runtime import on_every_process

FLAG = "--teacher_model"
PROJECTION = "distill_projection"  # the student's attribute holding the projection (never saved with it)
CACHE_VERSION = "1"  # bump when what the cached logits hold changes


# ---------------------------------------------------------------------------------------------
# Checks (all before any file is written)
# ---------------------------------------------------------------------------------------------

def check_engine(args, accelerator) -> None:
    """DeepSpeed: refused. FSDP: prediction-layer distillation from cached logits only."""
    kind = str(accelerator.distributed_type)
    if "DEEPSPEED" in kind:
        raise UserError("--teacher_model is not available under DeepSpeed (distributed_type: DEEPSPEED), where "
                        "distillation has not been tested; launch with accelerate_configs/multi_gpu.yaml (DDP), or "
                        "fsdp.yaml for prediction-layer distillation.")
    if "FSDP" in kind and (args.intermediate_losses() or not args.distill_cache_logits):
        raise UserError("under FSDP only prediction-layer distillation from cached teacher logits runs (its "
                        "sharded student cannot hand intermediate layers or a projection to the loss); drop "
                        "--distill_hidden/--distill_attention/--distill_embeddings/--no_distill_cache_logits or "
                        "launch with accelerate_configs/multi_gpu.yaml (DDP).")


def check_teacher(teacher_config, student_config, head: str, name: str) -> None:
    """The teacher must be a fine-tuned model of this task's head with exactly the student's label map."""
    archs = getattr(teacher_config, "architectures", None) or []
    if head and not any(a.endswith(head) for a in archs):
        raise UserError(f"{FLAG} '{name}' is a {', '.join(archs) or 'bare'} checkpoint, not a fine-tuned *{head} "
                        "model; distil from a teacher trained for this task (e.g. an output folder of this script).")
    teacher = [str(teacher_config.id2label[i]) for i in range(teacher_config.num_labels)]
    student = [str(student_config.id2label[i]) for i in range(student_config.num_labels)]
    if teacher != student:
        only_t, only_s = [x for x in teacher if x not in student], [x for x in student if x not in teacher]
        diff = ", ".join(part for part in (f"only the teacher has {only_t}" if only_t else "",
                                           f"only the student (from the data) has {only_s}" if only_s else "")
                         if part) or f"the same labels in another order (teacher {teacher}, student {student})"
        raise UserError(f"{FLAG} '{name}' predicts other labels than the student: {diff}; distil from a teacher "
                        "fine-tuned on this task's labels (e.g. an output folder of this script on the same data).")


def check_vocabulary(teacher_tok, student_tok, name: str, student_name: str) -> None:
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        differ = sorted({t for t in set(tv) | set(sv) if tv.get(t) != sv.get(t)})
        tok = differ[0]
        raise UserError(f"{FLAG} '{name}' has another vocabulary than the student's tokenizer ('{student_name}'): "
                        f"{len(differ)} tokens differ (e.g. {tok!r}: id {tv.get(tok)} in the teacher, {sv.get(tok)} "
                        "in the student); the teacher must use the student's tokenizer.")


def uniform_map(student_layers: int, teacher_layers: int) -> list[list[int]]:
    """Student layer m of M -> teacher layer round((m+1) N / M) - 1 of N (0-based): the last to the last."""
    return [[m, max(0, round((m + 1) * teacher_layers / student_layers) - 1)] for m in range(student_layers)]


def layer_map(args, student_layers: int, teacher_layers: int) -> list[list[int]]:
    if args.layer_map is None:
        return uniform_map(student_layers, teacher_layers)
    pairs = [list(p) for p in parse_layer_map(args.layer_map)]
    bad = [f"{s}:{t}" for s, t in pairs if s >= student_layers or t >= teacher_layers]
    if bad:
        raise UserError(f"--layer_map {args.layer_map}: {', '.join(bad)} is outside the student's {student_layers} "
                        f"layers (0-{student_layers - 1}) or the teacher's {teacher_layers} (0-{teacher_layers - 1}).")
    return pairs


# ---------------------------------------------------------------------------------------------
# Cached teacher logits
# ---------------------------------------------------------------------------------------------

class WithIndex(torch.utils.data.Dataset):
    """The training set with each example's position (or `index[position]`) as `example_index` (the key of its
    cached logits); every other use (columns by name, select_columns, ...) goes to the wrapped datasets.Dataset,
    nothing is copied."""

    def __init__(self, dataset, index=None):
        self.dataset = dataset
        self.index = index  # row i's logits are the store's example index[i] (a transfer set's selection)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.dataset[key]
        return {**self.dataset[int(key)], "example_index": int(key) if self.index is None else int(self.index[key])}

    def __getitems__(self, keys: list) -> list:
        return [self[k] for k in keys]

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling in a DataLoader worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


@dataclass
class LogitStore:
    """Teacher logits of every distilled item of the training set: example i's rows (one per item, in position
    order) are values[offsets[i]:offsets[i + 1]]."""
    values: torch.Tensor   # (items, classes) float32
    offsets: torch.Tensor  # (examples + 1,) int64

    def lookup(self, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch, positions, classes) logits for a batch's `example_index` and (batch, positions) distill mask;
        undistilled positions get some row (masked out later). No host sync."""
        rank = mask.long().cumsum(1) - 1  # the item's place among its example's items
        rows = (self.offsets[index].unsqueeze(1) + rank).clamp(0, len(self.values) - 1)
        return self.values[rows]


def data_fingerprint(dataset) -> str:
    """The hash of the model inputs and labels of a tokenized dataset, in its order (selections included)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = [c for c in ("input_ids", "token_type_ids", "attention_mask", "labels") if c in dataset.column_names]
    table = dataset.select_columns(cols).with_format("arrow")[:]
    h = hashlib.sha256(str(len(table)).encode())
    for name in cols:
        col = table[name]
        h.update(f"{name}:{col.type}".encode())
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            h.update(np.asarray(pc.list_value_length(col)).tobytes())
            col = pc.list_flatten(col)
        h.update(np.asarray(col).tobytes())
    return h.hexdigest()[:16]


def cache_folder() -> str:
    import datasets

    return os.path.join(datasets.config.HF_DATASETS_CACHE, "bert_finetune_teacher_logits")


def compute_logits(teacher, base: Objective, train, collator, accelerator, batch_size: int) -> LogitStore:
    """Collective: every process scores its share of the training set (longest first), gathered to all."""
    from torch.utils.data import DataLoader, Subset

    order = np.argsort(-lengths(train), kind="stable").tolist()
    loader = accelerator.prepare(DataLoader(Subset(WithIndex(train), order), batch_size=batch_size,
                                            collate_fn=collator))
    rows: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for batch in progress.track(loader, "teacher logits"):
            with accelerator.autocast():
                logits = teacher(**model_inputs(batch)).logits.float()
            mask = base.distill_mask(batch)
            n = len(mask)
            out = {"index": batch["example_index"], "logits": logits.reshape(n, -1, logits.shape[-1]),
                   "mask": mask.reshape(n, -1).long()}
            for key in ("logits", "mask"):
                out[key] = accelerator.pad_across_processes(out[key], dim=1, pad_index=0)
            out = {k: v.cpu().numpy() for k, v in accelerator.gather_for_metrics(out).items()}
            for i, lg, m in zip(out["index"], out["logits"], out["mask"]):
                rows[int(i)] = lg[m.astype(bool)]
    counts = np.array([len(rows[i]) for i in range(len(train))], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return LogitStore(torch.from_numpy(np.concatenate([rows[i] for i in range(len(train))])),
                      torch.from_numpy(offsets))


def cached_logits(key: str, n: int, compute: Callable[[], LogitStore], accelerator, overwrite: bool
                  ) -> tuple[LogitStore, bool]:
    """The store under `key` from the disk cache, or computed (collectively) and written there atomically by
    each machine's main process. Returns (store, whether it came from the cache)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(cache_folder(), f"{key}.safetensors")
    if overwrite and accelerator.is_local_main_process and os.path.isfile(path):
        os.unlink(path)
    accelerator.wait_for_everyone()
    if on_every_process(accelerator, os.path.isfile(path)):  # every process must find it, or all compute together
        saved = load_file(path)
        if len(saved["offsets"]) == n + 1:
            return LogitStore(saved["values"], saved["offsets"]), True
    store = compute()
    if accelerator.is_local_main_process:
        os.makedirs(cache_folder(), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            save_file({"values": store.values.contiguous(), "offsets": store.offsets}, tmp)
            honour_umask(tmp)  # safetensors writes mode 0600; the cache may be shared
            os.replace(tmp, path)
        except OSError as err:  # cache not writable: go on without it
            logger.warning("could not cache the teacher's logits in %s (%s)", path, err)
            if os.path.exists(tmp):
                os.unlink(tmp)
    accelerator.wait_for_everyone()
    return store, False


# ---------------------------------------------------------------------------------------------
# Attention scores and the objective
# ---------------------------------------------------------------------------------------------

class AttentionTaps:
    """Forward hooks on the query and key projections of some encoder layers; while `recording`, they keep
    those outputs, from which `scores` gives each layer's attention scores q.k/sqrt(d) (batch, heads, T, T)
    before mask and softmax, whatever attention kernel the model runs (SDPA computes them internally)."""

    def __init__(self, model, layers: list[int], who: str):
        _, stack = encoder_layers(model, "--distill_attention")
        self.modules, self.kept, self.on = [], {}, False
        for j, i in enumerate(layers):
            found = [m for m in stack[i].modules() if isinstance(getattr(m, "query", None), torch.nn.Linear)
                     and isinstance(getattr(m, "key", None), torch.nn.Linear)
                     and isinstance(getattr(m, "attention_head_size", None), int)]
            if not found:
                raise UserError(f"--distill_attention needs BERT-style self-attention (query/key projections), which "
                                f"the {who}'s layer {i} ({type(stack[i]).__name__}) does not have; drop "
                                "--distill_attention.")
            self.modules.append(found[0])
            found[0].query.register_forward_hook(functools.partial(self._keep, (j, "q")))
            found[0].key.register_forward_hook(functools.partial(self._keep, (j, "k")))

    def _keep(self, key, module, inputs, output) -> None:
        if self.on:
            self.kept[key] = output

    @contextlib.contextmanager
    def recording(self):
        self.on, self.kept = True, {}
        try:
            yield
        finally:
            self.on = False

    def scores(self) -> list[torch.Tensor]:
        out = []
        for j, attn in enumerate(self.modules):
            q, k = self.kept[(j, "q")].float(), self.kept[(j, "k")].float()
            b, t, d = q.shape[0], q.shape[1], attn.attention_head_size
            q, k = q.view(b, t, -1, d).transpose(1, 2), k.view(b, t, -1, d).transpose(1, 2)
            out.append(torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5)
        self.kept = {}
        return out


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over masked items of KL(softmax(teacher/T) || softmax(student/T)); logits (batch, positions, classes)."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1).masked_fill(~mask, 0.0).sum()


def example_mse(student: torch.Tensor, teacher: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per example: mean squared error over its real tokens and hidden units; (batch, T, d) and (batch, T)."""
    err = (student.float() - teacher.float()).pow(2).sum(-1).masked_fill(~real, 0.0).sum(1)
    return err / (real.sum(1).clamp(min=1) * student.shape[-1])


def example_score_mse(student: torch.Tensor, teacher: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per example: mean squared error of the attention scores over heads and real query-key pairs."""
    pairs = (real.unsqueeze(2) & real.unsqueeze(1)).unsqueeze(1)  # (batch, 1, T, T)
    err = (student - teacher).pow(2).masked_fill(~pairs, 0.0).sum((1, 2, 3))
    return err / (real.sum(1).clamp(min=1) ** 2 * student.shape[1])


@dataclass
class TeacherOutputs:
    logits: Optional[torch.Tensor]
    hidden: dict = field(default_factory=dict)   # hidden_states index -> (batch, T, d)
    scores: list = field(default_factory=list)   # per mapped layer (batch, heads, T, T)


class DistillObjective(Objective):
    """The task's objective with a teacher: training loss as in the module docstring; evaluation, metrics and
    item counts are the task's own."""

    def __init__(self, base: Objective, args, pairs: list, teacher=None, store: Optional[LogitStore] = None,
                 projection=None, taps: tuple = (None, None), autocast: Callable = contextlib.nullcontext,
                 info: Optional[dict] = None):
        self.base, self.teacher, self.store, self.projection, self.autocast = base, teacher, store, projection, autocast
        self.default_metric, self.eval_pad_values = base.default_metric, base.eval_pad_values
        self.alpha, self.temperature, self.prediction = args.distill_alpha, args.distill_temperature, \
            args.distill_prediction
        self.losses, self.weight = args.intermediate_losses(), args.distill_intermediate_weight
        self.pairs = pairs
        self.student_taps, self.teacher_taps = taps
        # hidden_states indices: 0 the embeddings' output, m + 1 layer m's output
        self.hidden_pairs = ([(0, 0)] if "embeddings" in self.losses else []) + (
            [(s + 1, t + 1) for s, t in pairs] if "hidden" in self.losses else [])
        self.info = info or {}
        self.samples = ""  # the transfer set's variants for a person to read (augment_samples.txt)

    # the task's own
    def after_prepare(self, model) -> None:
        self.base.after_prepare(model)

    def total_items(self, dataset):
        return self.base.total_items(dataset)

    def prepare_batch(self, batch):
        return self.base.prepare_batch(batch)

    def count_items(self, batch):
        return self.base.count_items(batch)

    def eval_outputs(self, model, batch):
        return self.base.eval_outputs(model, batch)

    def compute_metrics(self, outputs):
        return self.base.compute_metrics(outputs)

    def report(self) -> dict:
        return {"distillation": self.info}

    def output_files(self) -> dict:
        return {transfer.SAMPLES: self.samples} if self.samples else {}

    def state_for_saving(self, model, state_dict: dict) -> dict:
        return {k: v for k, v in state_dict.items() if not k.startswith(PROJECTION + ".")}

    # the distillation loss
    def _teacher(self, inputs: dict) -> TeacherOutputs:
        taps = self.teacher_taps.recording() if self.teacher_taps else contextlib.nullcontext()
        with torch.inference_mode(), self.autocast(), taps:
            out = self.teacher(**inputs, output_hidden_states=bool(self.hidden_pairs))
            kept = TeacherOutputs(out.logits, {t: out.hidden_states[t] for _, t in self.hidden_pairs},
                                  self.teacher_taps.scores() if self.teacher_taps else [])
        # inference tensors cannot be saved for backward: plain copies of what the losses read
        return TeacherOutputs(kept.logits.clone(), {t: h.clone() for t, h in kept.hidden.items()},
                              [s.clone() for s in kept.scores])

    def loss_sum(self, model, batch):
        inputs = model_inputs(batch)
        mask = self.base.distill_mask(batch)
        items = mask.reshape(len(mask), -1)  # (batch, positions): classification has one position per example
        teacher = self._teacher(inputs) if self.teacher is not None else None
        taps = self.student_taps.recording() if self.student_taps else contextlib.nullcontext()
        with taps:
            out = model(**inputs, output_hidden_states=bool(self.hidden_pairs))
        logits = out.logits
        if self.prediction:
            # a transfer set's variants and unlabelled rows (gold 0) have no hard labels: soft loss only
            hard = self.base.without_labels(batch, batch["gold"].bool()) if "gold" in batch else batch
            loss = self.alpha * self.base.loss_from_logits(logits, hard)
            if self.alpha < 1:
                flat = logits.reshape(items.shape[0], items.shape[1], logits.shape[-1])
                target = (teacher.logits.reshape(flat.shape) if teacher is not None
                          else self.store.lookup(batch["example_index"], items))
                loss = loss + (1 - self.alpha) * self.temperature ** 2 * kl_sum(flat, target, items,
                                                                                self.temperature)
        else:  # stage 1: the head takes no part, but stays in the graph (DDP expects every parameter's gradient)
            loss = logits.sum() * 0.0
        if self.losses:
            per_example = self._intermediate(out, teacher, batch["attention_mask"].bool())
            loss = loss + self.weight * (per_example * items.sum(1)).sum()
        return loss

    def _intermediate(self, out, teacher: TeacherOutputs, real: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(real.shape[0], device=real.device, dtype=torch.float32)
        for s, t in self.hidden_pairs:
            h = out.hidden_states[s]
            if self.projection is not None:  # outside the model's autocast: in the projection's own dtype
                h = self.projection(h.to(self.projection.weight.dtype))
            total = total + example_mse(h, teacher.hidden[t], real)
        if "attention" in self.losses:
            for mine, theirs in zip(self.student_taps.scores(), teacher.scores):
                total = total + example_score_mse(mine, theirs, real)
        return total


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------

def load_teacher(task, ctx):
    """The teacher's weights, for inference only (eval mode, no gradients, on the run's device)."""
    import transformers

    name = ctx.args.teacher_model
    built = load_pretrained(getattr(transformers, "AutoModel" + task.head), ctx.model_args, name=name, flag=FLAG)
    new = built.untrained
    if new:
        more = " ..." if len(new) > 4 else ""
        raise UserError(f"{FLAG} '{name}' has no trained weights for {', '.join(new[:4])}{more}; distil "
                        "from a teacher fine-tuned for this task (e.g. an output folder of this script).")
    return built.model.eval().requires_grad_(False).to(ctx.accelerator.device)


def setup(task, ctx, data, built, objective: Objective, collator) -> DistillObjective:
    """Check the teacher against the student and wrap the task's objective (see the module docstring).
    With cached logits, data.train is wrapped to carry each example's position (`WithIndex`)."""
    args, acc, name = ctx.args, ctx.accelerator, ctx.args.teacher_model
    started = time.perf_counter()
    check_engine(args, acc)
    if not objective.supports_distillation:
        raise UserError(f"{FLAG}: distillation needs a teacher's class distribution, which {task.name or 'this task'}"
                        f"{' (regression)' if task.name == 'classification' else ''} does not have; drop {FLAG}.")
    t_config, s_config = load_config(ctx.model_args, name, FLAG), built.model.config
    check_teacher(t_config, s_config, task.head, name)
    check_vocabulary(load_tokenizer(ctx.model_args, name, FLAG), ctx.tokenizer, name,
                     ctx.model_args.tokenizer_name or ctx.model_args.model)
    losses = args.intermediate_losses()
    pairs = layer_map(args, s_config.num_hidden_layers, t_config.num_hidden_layers) if losses else []
    if "attention" in losses and s_config.num_attention_heads != t_config.num_attention_heads:
        raise UserError(f"--distill_attention compares attention heads one to one, but the student has "
                        f"{s_config.num_attention_heads} heads and {FLAG} '{name}' {t_config.num_attention_heads}; "
                        "drop --distill_attention or use a student with the teacher's head count.")
    projection = None
    if {"hidden", "embeddings"} & set(losses) and s_config.hidden_size != t_config.hidden_size:
        projection = torch.nn.Linear(s_config.hidden_size, t_config.hidden_size)  # seeded: after set_seed
        built.model.add_module(PROJECTION, projection)  # trained and checkpointed with the student, not saved
    fingerprint = model_fingerprint(name, ctx.model_args)
    info = {"teacher": name, "teacher_fingerprint": fingerprint, "teacher_layers": t_config.num_hidden_layers,
            "teacher_hidden_size": t_config.hidden_size, "student_layers": s_config.num_hidden_layers,
            "alpha": args.distill_alpha, "temperature": args.distill_temperature,
            "prediction": args.distill_prediction, "intermediate": losses,
            "intermediate_weight": args.distill_intermediate_weight, "layer_map": pairs or None,
            "projection": [s_config.hidden_size, t_config.hidden_size] if projection else None}
    data.identity["distillation"] = {k: info[k] for k in ("teacher_fingerprint", "alpha", "temperature", "prediction",
                                                          "intermediate", "layer_map")}
    built_transfer = None
    if transfer.wanted(args):  # TinyBERT's augmented variants and/or unlabelled rows, for the teacher to label
        built_transfer = transfer.build(task, ctx, data)
        info["transfer"] = built_transfer.info
        data.identity["distillation"]["transfer"] = transfer.identity(built_transfer.info)
        data.train = built_transfer.train
        ctx.timings["transfer_seconds"] = built_transfer.info["build_seconds"]
    per_step = bool(losses) or not args.distill_cache_logits
    needs_logits = args.distill_prediction and args.distill_alpha < 1
    teacher, store, taps = None, None, (None, None)
    if per_step:
        with progress.phase(f"loading the teacher {name}", "run at every step"):
            teacher = load_teacher(task, ctx)
        if "attention" in losses:
            taps = (AttentionTaps(built.model, [s for s, _ in pairs], "student"),
                    AttentionTaps(teacher, [t for _, t in pairs], "teacher"))
        info["teacher_logits"] = "per step"
    elif needs_logits:
        from .build import eval_batch_size

        labelled = built_transfer.pool if built_transfer is not None else data.train  # what the teacher scores
        key = hashlib.sha256(json.dumps([CACHE_VERSION, fingerprint, data_fingerprint(labelled), acc.mixed_precision,
                                         acc.device.type]).encode()).hexdigest()[:24]

        def compute() -> LogitStore:  # not cached yet: the one slow part of a distillation's start
            what = "training examples" if built_transfer is None else "rows of the transfer set"
            with progress.phase("computing the teacher's logits", f"{len(labelled):,} {what}, cached for later runs"):
                model = load_teacher(task, ctx)
                store = compute_logits(model, objective, labelled, collator, acc, eval_batch_size(args, acc.device))
            del model
            gc.collect()
            return store

        t_logits = time.perf_counter()
        store, hit = cached_logits(key, len(labelled), compute, acc, ctx.data_args.overwrite_cache)
        if built_transfer is not None:
            built_transfer.info["label_seconds"] = round(time.perf_counter() - t_logits, 2)
            built_transfer.info["logits_mb"] = round(store.values.numel() * 4 / 2**20, 2)
        store = LogitStore(store.values.to(acc.device), store.offsets.to(acc.device))
        data.train = WithIndex(data.train, None if built_transfer is None else built_transfer.index)
        info.update(teacher_logits="cached", cache={"key": key, "hit": hit, "items": len(store.values)})
    else:
        logger.warning("--distill_alpha 1 without intermediate losses: the teacher is not used")
        info["teacher_logits"] = "not used"
    info["teacher_seconds"] = ctx.timings["teacher_seconds"] = time.perf_counter() - started
    hidden = ("teacher", "teacher_fingerprint", "transfer")
    logger.info("distilling from %s: %s", name, ", ".join(f"{k}={v}" for k, v in info.items() if k not in hidden))
    wrapped = DistillObjective(objective, args, pairs, teacher, store, projection, taps, acc.autocast, info)
    wrapped.samples = built_transfer.samples if built_transfer is not None else ""
    return wrapped
