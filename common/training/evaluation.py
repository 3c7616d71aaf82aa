"""Gathered evaluation: every process evaluates its shard; `gather_for_metrics` returns each row
exactly once (duplicates added by uneven sharding dropped); per-token outputs are padded to a
common length across processes first."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .. import progress


@dataclass
class EvalResult:
    metrics: dict
    outputs: dict  # key -> np.ndarray, in dataset order of the eval dataloader

    @property
    def num_examples(self) -> int:
        return len(next(iter(self.outputs.values()))) if self.outputs else 0


def evaluate(model, objective, dataloader, accelerator, desc: str = "eval",
             run_batch: Optional[Callable[[dict], dict]] = None) -> EvalResult:
    """Collective: run the objective's eval_outputs over a prepared dataloader and compute metrics (a
    progress bar named `desc` on the main process). `run_batch`: what computes a batch's outputs instead
    (captured evaluation, training/capture.py)."""
    was_training = model.training
    model.eval()
    # Outputs stay on the device until the last batch: a copy to the host per batch would make the host wait for
    # each batch before it can queue the next (on a GPU; on CPU the copy is free either way).
    chunks: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for batch in progress.track(dataloader, desc):
            outs = objective.eval_outputs(model, batch) if run_batch is None else run_batch(batch)
            for key, pad in objective.eval_pad_values.items():
                if key in outs:
                    outs[key] = accelerator.pad_across_processes(outs[key], dim=1, pad_index=pad)
            outs = accelerator.gather_for_metrics(outs)
            for key, value in outs.items():
                chunks.setdefault(key, []).append(value.float() if value.is_floating_point() else value)
    reshard(model)
    if was_training:
        model.train()
    outputs = {k: concat([t.cpu().numpy() for t in v], objective.eval_pad_values.get(k, 0)) for k, v in chunks.items()}
    return EvalResult(objective.compute_metrics(outputs), outputs)


def reshard(model) -> None:
    """Give FSDP2 modules their sharded parameters back after evaluation.

    A module that does not reshard after forward (accelerate's FSDP2 root, which holds the embeddings,
    pooler and head of these encoders) keeps its parameters gathered until a backward: after an
    evaluation they would stay full, plain tensors, and the next checkpoint save/load (which expects
    the sharded DTensors the optimizer holds) fails. No-op without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def concat(arrays: list[np.ndarray], pad) -> np.ndarray:
    """Concatenate batches along dim 0, padding dim 1 of per-token outputs to the widest batch."""
    if not arrays:
        return np.zeros((0,))
    if arrays[0].ndim >= 2:
        width = max(a.shape[1] for a in arrays)
        padded = []
        for a in arrays:
            if a.shape[1] < width:
                shape = (a.shape[0], width - a.shape[1]) + a.shape[2:]
                a = np.concatenate([a, np.full(shape, pad, dtype=a.dtype)], axis=1)
            padded.append(a)
        arrays = padded
    return np.concatenate(arrays, axis=0)
