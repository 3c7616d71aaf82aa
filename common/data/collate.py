"""Batching: dynamic padding, length-grouped training order, length-sorted evaluation order."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

# Padding values per key; keys not listed are stacked as they are (scalar labels, row ids).
PAD_VALUES = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": -100,
              "special_tokens_mask": 1, "word_ids": -1, "word_start": 1}
# Scalar keys batched too: row ids, labels, the training example's position (distill.py's cached logits) and
# whether its labels are gold (a transfer set's variants and unlabelled rows are not: training/transfer.py).
SCALAR_KEYS = ("row_id", "labels", "example_index", "gold")


def pad_multiple(args, accelerator) -> Optional[int]:
    """The multiple batch lengths are rounded up to (see --pad_to_multiple_of)."""
    if args.pad_to_multiple_of:
        return args.pad_to_multiple_of
    if args.torch_compile:
        return 32
    return 8 if accelerator.mixed_precision in ("fp16", "bf16") else None


def graph_buckets() -> list[int]:
    """The lengths batches are padded to when steps are captured as CUDA graphs (one graph per length): multiples
    of 32 up to 128, of 64 up to 512 (at most 36% padding past 32 tokens, 10 graphs); longer batches are rounded
    up to a multiple of 256."""
    return list(range(32, 129, 32)) + list(range(192, 513, 64))


def bucket_of(longest: int, buckets: Sequence[int]) -> int:
    for length in buckets:
        if length >= longest:
            return length
    return int(math.ceil(longest / 256) * 256)


class PadCollator:
    """Pads variable-length features to the longest in the batch (rounded up to `multiple`, or to the next of
    `buckets`), or to `fixed_length` (XLA wants static shapes). Ragged keys are the list-valued ones."""

    def __init__(self, pad_token_id: int, multiple: Optional[int] = None, fixed_length: Optional[int] = None,
                 keys: Optional[Sequence[str]] = None, buckets: Optional[Sequence[int]] = None):
        self.pad_values = dict(PAD_VALUES, input_ids=pad_token_id)
        self.multiple = multiple
        self.fixed_length = fixed_length
        self.keys = keys
        self.buckets = list(buckets) if buckets else None

    def target_length(self, longest: int) -> int:
        if self.fixed_length:
            return self.fixed_length
        if self.buckets:
            return bucket_of(longest, self.buckets)
        if self.multiple:
            return int(math.ceil(longest / self.multiple) * self.multiple)
        return longest

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        keys = self.keys or [k for k in features[0] if k in self.pad_values or k in SCALAR_KEYS]
        batch: dict[str, torch.Tensor] = {}
        length = None
        for key in keys:
            values = [f[key] for f in features]
            if isinstance(values[0], (list, np.ndarray)):
                if length is None:
                    length = self.target_length(max(len(v) for v in values))
                pad = self.pad_values.get(key, 0)
                arr = np.full((len(values), length), pad, dtype=np.int64)
                for i, v in enumerate(values):
                    arr[i, : len(v)] = v
                batch[key] = torch.from_numpy(arr)
            else:
                dtype = torch.float32 if isinstance(values[0], float) else torch.long
                batch[key] = torch.tensor(values, dtype=dtype)
        return batch


class LengthGroupedSampler(Sampler[int]):
    """Random order in which consecutive `batch_size` indices have similar lengths.

    Each epoch: shuffle all indices (seeded by seed + epoch), cut into mega-batches of
    `batch_size * group` indices, sort each by length, cut into batches, shuffle the order of the
    full batches (the one short batch, if any, stays last so batch boundaries never move).
    Same seed and epoch => same order on every process, which accelerate's sharding relies on.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 50,
                 shuffle_batches: bool = True):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group = group
        self.shuffle_batches = shuffle_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        mega = self.batch_size * self.group
        chunks = [order[i: i + mega] for i in range(0, len(order), mega)]
        chunks = [c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]
        flat = np.concatenate(chunks)
        n_full = len(flat) // self.batch_size
        batches = [flat[i * self.batch_size: (i + 1) * self.batch_size] for i in range(n_full)]
        rest = flat[n_full * self.batch_size:]
        if self.shuffle_batches:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if len(rest):
            batches.append(rest)
        return iter(np.concatenate(batches).tolist() if batches else [])


class SeededRandomSampler(Sampler[int]):
    """A plain random permutation per epoch, derived from (seed, epoch) alone: resuming in the
    middle of an epoch replays the very same order."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


def length_sorted(dataset, length_column: str = "length"):
    """Evaluation order: longest first, so batches pad little; predictions carry `row_id` back."""
    from .loading import column_arrays  # (imported here: this module imports no other)

    lengths = column_arrays(dataset, length_column)[length_column]
    return dataset.select(np.argsort(-lengths, kind="stable"))
