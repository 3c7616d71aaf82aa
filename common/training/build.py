"""Building the training objects of one run: samplers and loaders, fast dropout, the optimizer,
`accelerator.prepare`, and the schedule with every length counted in optimizer steps.

Returns one `Training` dataclass; the loop reads its step counts and objects from there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import TrainArguments
from ..data.collate import LengthGroupedSampler, SeededRandomSampler, bucket_of
from ..data.loading import column_arrays
from ..errors import UserError

# Devices where auto picks fused AdamW (PyTorch has it for CUDA, XPU, MPS and, since 2.4, CPU). On the
# 2-core CPU here the fused step of a MiniLM-sized model takes 14 ms against 63 ms for foreach.
FUSED_ADAMW_DEVICES = ("cuda", "xpu", "mps", "cpu")


@dataclass
class Training:
    model: Any                    # prepared (wrapped for DDP/FSDP/compile)
    optimizer: Any                # prepared
    scheduler: Any                # NOT prepared: steps once per optimizer step
    train_dl: Any                 # prepared (sharded across processes)
    eval_dl: Any                  # prepared, or None without evaluation data
    collator: Any
    train_examples: int
    eval_batch_size: int
    optimizer_implementation: str
    fast_dropout: Optional[dict]  # what common/training/dropout.py replaced (None if not used)
    batches_per_epoch: int        # micro-batches per epoch on this process
    steps_per_epoch: int          # optimizer steps per epoch
    total_steps: int
    num_epochs: int
    warmup_steps: int
    logging_steps: int
    items_per_step: Optional[float]  # fixed loss denominator (token tasks, length-grouped), else None
    sharding: Optional[dict] = None  # FSDP: its settings and the parameters each process holds
    buckets: Optional[list] = None   # --cuda_graphs: the padded lengths batches take (collate.graph_buckets)
    train_shapes: int = 0            # ... how many of them the training rows reach (a graph each)


def planned_optimizer(args: TrainArguments, device: torch.device) -> str:
    """The AdamW implementation --optim asks for on this device (build_optimizer may fall back from fused)."""
    if args.optim != "auto":
        return args.optim
    return "adamw_torch_fused" if device.type in FUSED_ADAMW_DEVICES else "adamw_torch_foreach"


def build_optimizer(model, args: TrainArguments, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW without decay on biases and norms; returns (optimizer, implementation used)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias")
         else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    choice = planned_optimizer(args, device)
    if choice == "adamw_torch_fused":
        kw["fused"] = True  # one kernel for all parameters
    elif choice == "adamw_torch_foreach":
        kw["foreach"] = True
    try:
        return torch.optim.AdamW(groups, **kw), choice
    except (RuntimeError, TypeError) as err:  # fused not available for this device/dtype
        if args.optim != "auto":
            raise UserError(f"--optim {args.optim} is not available here ({str(err).splitlines()[0][:150]}); "
                            "use --optim auto.") from None
        kw.pop("fused", None)
        kw["foreach"] = True
        return torch.optim.AdamW(groups, **kw), "adamw_torch_foreach"


def check_fsdp_model(model, accelerator) -> None:
    """Refuse, before any file is written, a model accelerate's FSDP2 wrapping would break.

    accelerate (fsdp2_prepare_model) gives each layer class in fsdp_transformer_layer_cls_to_wrap its
    own fully_shard group, the input and output embeddings one group when their weights are tied, and
    everything else the root group. PyTorch lets a parameter live in one group only (torch >= 2.13
    raises at the first forward; older versions would shard two copies), so a parameter registered
    under two modules of different groups cannot be trained: BERT's MLM head registers its decoder
    bias as both cls.predictions.bias (root group) and cls.predictions.decoder.bias (embeddings group)."""
    if accelerator.distributed_type != "FSDP":
        return
    plugin = accelerator.state.fsdp_plugin
    wrap = plugin.transformer_cls_names_to_wrap
    classes = {type(m).__name__ for m in model.modules()}
    if wrap is not None and not set(wrap) <= classes:
        own = ", ".join(sorted(getattr(model, "_no_split_modules", None) or [])) or "none declared"
        raise UserError(f"the accelerate config's fsdp_transformer_layer_cls_to_wrap names {', '.join(sorted(wrap))}, "
                        f"which {type(model).__name__} does not have (its blocks: {own}); name the model's "
                        "transformer layer class there (BertLayer, RobertaLayer, ...).")
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = inp is not None and out is not None and getattr(inp, "weight", None) is getattr(out, "weight", 0)

    def group(module_name: str) -> str:
        parts = module_name.split(".") if module_name else []
        for i in range(len(parts), 0, -1):  # the nearest wrapped module, this one included
            name = ".".join(parts[:i])
            sub = model.get_submodule(name)
            if type(sub).__name__ in (wrap or ()):
                return name
            if sub is out or (sub is inp and tied):
                return "output (and tied input) embeddings"
            if sub is inp:
                return "input embeddings"
        return "root"

    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for names in owners.values():
        if len(names) > 1 and len({group(n.rpartition(".")[0]) for n in names}) > 1:
            raise UserError(f"accelerate's FSDP cannot shard {type(model).__name__}: its parameter {names[0]} is also "
                            f"registered as {', '.join(names[1:])}, and accelerate puts these names in different "
                            "fully_shard groups, which PyTorch does not allow; train it with "
                            "accelerate_configs/multi_gpu.yaml (DDP) instead.")


def materialise_meta_parameters(model, accelerator) -> int:
    """Give parameters left on the meta device uninitialised CPU storage; returns how many there were.

    Under FSDP's RAM-efficient loading (fsdp_cpu_ram_efficient_loading) transformers leaves the weights
    that are not in the checkpoint (our new heads) on the meta device on every rank but local rank 0;
    prepare() then broadcasts rank 0's values into the shards. accelerate maps the optimizer's
    parameters to the sharded ones by storage address, which all meta tensors share (0): the optimizer
    of those ranks would then hold one parameter many times and never update the others. Distinct
    storage (never read: untouched pages cost no RAM) keeps the mapping right; ties are kept."""
    meta = {id(p): p for p in model.parameters() if p.is_meta}
    if not meta:
        return 0
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != "FSDP" or not getattr(plugin, "cpu_ram_efficient_loading", False):
        raise RuntimeError(f"{len(meta)} parameters are on the meta device but nothing will broadcast their values")
    real: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                if id(param) not in real:
                    real[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu"),
                                                         requires_grad=param.requires_grad)
                setattr(module, name, real[id(param)])
    return len(meta)


def fsdp_summary(model, accelerator) -> Optional[dict]:
    """Collective under FSDP: its settings and the parameter elements each process holds (its shards);
    None otherwise. results.json shows it, so a sharded run can be told from a replicated one."""
    if accelerator.distributed_type != "FSDP":
        return None
    plugin = accelerator.state.fsdp_plugin
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    per_process = accelerator.gather(torch.tensor([local], device=accelerator.device)).tolist()
    reshard = plugin.reshard_after_forward
    return {"version": plugin.fsdp_version, "state_dict_type": str(plugin.state_dict_type).split(".")[-1],
            "reshard_after_forward": reshard if isinstance(reshard, (bool, int)) else str(reshard),
            "cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading),
            "parameters": sum(p.numel() for p in model.parameters()), "parameters_per_process": per_process}


def install_fast_dropout(model, args: TrainArguments, device: torch.device) -> Optional[dict]:
    """common/training/dropout.py's masks on CPU (not under torch.compile, whose own RNG is fast); None if not used."""
    if not (args.fast_dropout and device.type == "cpu" and not args.torch_compile):
        return None
    from . import dropout

    return dropout.install(model)


def eval_batch_size(args: TrainArguments, device: torch.device) -> int:
    # Evaluation runs under inference_mode; on CPU a batch 4x larger measured 5% slower (MLM, WikiText-2).
    return args.per_device_eval_batch_size or args.per_device_train_batch_size * (1 if device.type == "cpu" else 4)


def eval_loader(dataset, batch_size: int, collator, args: TrainArguments) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator,
                      num_workers=args.dataloader_num_workers)


def build_training(objective, model, args: TrainArguments, accelerator, train_dataset, eval_dataset,
                   collator, buckets: Optional[list] = None) -> Training:
    device = accelerator.device
    batch_size = args.per_device_train_batch_size
    sampler = (LengthGroupedSampler(lengths(train_dataset), batch_size, args.seed) if args.group_by_length
               else SeededRandomSampler(len(train_dataset), args.seed))
    train_dl = DataLoader(train_dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                          num_workers=args.dataloader_num_workers, pin_memory=device.type == "cuda")
    eval_bs = eval_batch_size(args, device)
    eval_dl = eval_loader(eval_dataset, eval_bs, collator, args) if eval_dataset is not None else None
    materialise_meta_parameters(model, accelerator)
    fast_dropout = install_fast_dropout(model, args, device)
    optimizer, implementation = build_optimizer(model, args, device)
    if eval_dl is not None:
        model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    else:
        model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    objective.after_prepare(accelerator.unwrap_model(model))
    sharding = fsdp_summary(model, accelerator)

    # Schedule lengths in optimizer steps, computed on the *prepared* (sharded) dataloader.
    batches_per_epoch = len(train_dl)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / args.gradient_accumulation_steps))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    # Token-level losses under length grouping: a step's batches hold sentences of one length, so
    # dividing each step by its own token count gives a token of a short-sentence step several
    # times the weight of one in a long-sentence step (measured on CoNLL-2003: -1 point of F1).
    # Dividing by the epoch's mean count per step weighs every token alike, as in the full-data loss.
    items_per_step = None
    if args.group_by_length:
        total = objective.total_items(train_dataset)
        if total:
            items_per_step = float(total) / steps_per_epoch
    from transformers import get_scheduler

    # Not passed to prepare(): a prepared scheduler steps once per process; ours steps once per
    # optimizer step, which is the unit every length above is counted in. Its position is saved as
    # JSON in our trainer state, not through register_for_checkpointing (unpickled on load).
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=total_steps)
    return Training(model=model, optimizer=optimizer, scheduler=scheduler, train_dl=train_dl, eval_dl=eval_dl,
                    collator=collator, train_examples=len(train_dataset), eval_batch_size=eval_bs,
                    optimizer_implementation=implementation, fast_dropout=fast_dropout,
                    batches_per_epoch=batches_per_epoch, steps_per_epoch=steps_per_epoch,
                    total_steps=total_steps, num_epochs=math.ceil(total_steps / steps_per_epoch),
                    warmup_steps=warmup_steps, logging_steps=args.logging_steps or max(1, min(50, total_steps // 40)),
                    items_per_step=items_per_step, sharding=sharding, buckets=buckets,
                    train_shapes=bucket_count(train_dataset, buckets))


def bucket_count(dataset, buckets: Optional[list]) -> int:
    """The padded lengths the rows of `dataset` reach (their `length` column), or every bucket without one."""
    if not buckets:
        return 0
    if "length" not in getattr(dataset, "column_names", ()):
        return len(buckets)
    return len({bucket_of(int(n), buckets) for n in set(lengths(dataset).tolist())})


def lengths(dataset) -> np.ndarray:
    """The `length` column as one array (one Arrow pass, not a Python object per row)."""
    return column_arrays(dataset, "length")["length"]
