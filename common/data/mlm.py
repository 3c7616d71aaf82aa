"""Masked-language-model pieces: plain-text reading, packing into blocks, (whole-word) masking,
and running the vocabulary decoder only where a token is masked.

Masking works on tensors of token ids with a `word_start` flag per token (1 where a new word, a
special token or a block begins). A word is selected with probability p by the random draw of
its first token, so every sub-token of a word shares its fate and the expected masked-token rate
is exactly p; the selected tokens then follow the 80/10/10 rule ([MASK] / random token / kept).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from ..errors import UserError, fmt_columns
from ..files import check_file, file_extension, honour_umask, read_text
from .loading import TABLE_EXTENSIONS, read_hub_splits, read_table, require_columns
from .validate import text_values

TEXT_EXTENSIONS = (".txt", ".tokens", ".raw", ".text")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_text_lines(path: str, flag: str, encoding: str = "utf-8") -> list[str]:
    """Non-blank lines of a text file (possibly compressed), stripped. An undecodable byte is reported
    with its line."""
    check_file(path, flag, TEXT_EXTENSIONS)
    lines = [line.strip() for line in read_text(path, flag, encoding).split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"{flag} '{path}' has no text (every line is blank).")
    return lines


def read_splits(a, cache_dir: Optional[str], candidates: Sequence[str]) -> tuple[dict, dict, dict, str]:
    """split -> texts, split -> where from, split -> blank rows skipped, and where the text is (for the log);
    `a`: the data arguments, `candidates`: text column names recognised without --text_column."""
    texts, where, skipped, columns = {}, {}, {}, []
    if a.dataset:
        names = {"train": a.train_split_name, "validation": a.validation_split_name, "test": "test"}
        tables, where = read_hub_splits(a, cache_dir, names)
        for split, ds in tables.items():
            col = text_column_of(ds.column_names, a.text_column, candidates, where[split])
            texts[split], skipped[split] = texts_from_column(ds[col], where[split], col)
            columns.append(f"text column '{col}'")
    for split, path, flag in (("train", a.train_file, "--train_file"), ("validation", a.validation_file,
                              "--validation_file"), ("test", a.test_file, "--test_file")):
        if path and not a.dataset:
            texts[split], skipped[split], col = read_texts(path, flag, a, candidates)
            where[split] = f"{flag} '{path}'"
            columns.append(f"text column '{col}'" if col else "one text per line")
    return texts, where, skipped, "; ".join(dict.fromkeys(columns))


def file_layout(path: str, flag: str) -> str:
    """'lines' for a plain text file (one text per line), 'table' for a table."""
    return "lines" if file_extension(path, flag) in TEXT_EXTENSIONS else "table"


def read_texts(path: str, flag: str, a, candidates: Sequence[str]) -> tuple[list[str], int, Optional[str]]:
    """(non-blank texts, number of blank/missing rows skipped, the table's text column or None for a text file)
    from a text file or a table; `a`: the data arguments (text_column, encoding, column_names, delimiter)."""
    ext = check_file(path, flag, TEXT_EXTENSIONS + TABLE_EXTENSIONS)
    if ext in TEXT_EXTENSIONS:
        flags = ("text_column", "column_names", "delimiter")
        given = next((f"--{n}" for n in flags if getattr(a, n) is not None), None)
        if given:
            raise UserError(f"{given} was given but {flag} '{path}' is a plain text file (one text per line); drop "
                            f"{given} or pass a table.")
        return read_text_lines(path, flag, a.encoding), 0, None
    df = read_table(path, flag, a.encoding, a.column_names, a.delimiter)
    col = text_column_of(list(df.columns), a.text_column, candidates, f"{flag} '{path}'")
    return *texts_from_column(df[col].tolist(), f"{flag} '{path}'", col), col


def text_column_of(columns: list, given: Optional[str], candidates: Sequence[str], where: str) -> str:
    """The text column of a table: --text_column, else the one known name present, else the only column."""
    if given:
        require_columns(columns, [given], where, {given: "--text_column"})
        return given
    found = [c for c in candidates if c in columns]
    if len(found) == 1:
        return found[0]
    if len(columns) == 1:
        return columns[0]
    raise UserError(f"{where}: cannot tell the text column among {fmt_columns(columns)}; pass --text_column.")


def texts_from_column(values: list, where: str, column: str) -> tuple[list[str], int]:
    """(stripped texts, number of empty rows skipped); a cell that is not text (a number, a list, ...) is an error
    naming its row, and so is a column of nothing but numbers (validate.text_values)."""
    texts, skipped = text_values(values, where, column, "--text_column", skip_missing=True)
    texts = [t.strip() for t in texts]
    return texts, skipped


def encoder(tokenizer, packed: bool, max_length: int, whole_word_mask: bool):
    """The batched tokenization function: packed mode keeps every token of every text (no special
    tokens, no truncation: `pack` adds [CLS]/[SEP] per block); line-by-line truncates each line."""
    def encode(batch):
        if packed:
            enc = tokenizer(batch["text"], add_special_tokens=False, verbose=False)
        else:
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        out = {"input_ids": enc["input_ids"]}
        if not packed:
            out["attention_mask"] = enc["attention_mask"]
            out["length"] = [len(x) for x in enc["input_ids"]]
        if whole_word_mask:
            out["word_start"] = [word_starts(enc.word_ids(i)) for i in range(len(enc["input_ids"]))]
        return out

    return encode


# ---------------------------------------------------------------------------------------------
# Word starts and packing
# ---------------------------------------------------------------------------------------------

def word_starts(word_ids: Sequence[Optional[int]]) -> list[int]:
    """1 where a token begins a word (or is special), 0 for a word's later pieces. Uses the fast
    tokenizer's word_ids(), so it holds for WordPiece ('##'), SentencePiece and byte-level BPE."""
    out, prev = [], None
    for w in word_ids:
        out.append(1 if w is None or w != prev else 0)
        prev = w
    return out


def check_maskable(dataset, special_ids: Sequence[int], where: str, mask_token: str) -> None:
    """Text made of nothing but special tokens ('[MASK] [SEP]' written out) has nothing to predict."""
    ids, _ = _flat(dataset, "input_ids")
    if not np.isin(ids, np.asarray(list(special_ids), dtype=ids.dtype if len(ids) else np.int64), invert=True).any():
        raise UserError(f"{where} has no token that can be masked: its text is only special tokens such as "
                        f"{mask_token} written out (the tokenizer reads them as special); pass real text.")


def _flat(dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column, without a Python loop over rows."""
    arr = dataset.data.column(column).combine_chunks()
    if isinstance(arr, pa.ChunkedArray):  # pyarrow < 13 may return a ChunkedArray
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=arr.type)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values, offsets - offsets[0]


def pack(dataset, max_length: int, cls_id: int, sep_id: int, with_word_start: bool):
    """Concatenate every text (token ids without special tokens) with [SEP] between texts, cut the
    stream into bodies of max_length - 2 tokens and wrap each as [CLS] body [SEP]. The last, shorter
    block is kept: nothing is dropped, so even a one-line corpus gives one block.

    Returns a datasets.Dataset with input_ids, attention_mask, length (and word_start)."""
    import datasets

    ids, offsets = _flat(dataset, "input_ids")
    starts = offsets[1:-1]  # where texts 2..n begin: a [SEP] goes in front of each
    stream = np.insert(ids.astype(np.int64), starts, sep_id)
    ws_stream = None
    if with_word_start:
        ws, _ = _flat(dataset, "word_start")
        ws_stream = np.insert(ws.astype(np.int8), starts, 1)
    body = max_length - 2
    total = len(stream)
    if total == 0:
        raise UserError("the text has no tokens after tokenization.")
    n_blocks = math.ceil(total / body)
    lengths = np.full(n_blocks, body + 2, dtype=np.int64)
    lengths[-1] = total - body * (n_blocks - 1) + 2

    def wrap(values: np.ndarray, first: int, last: int, dtype) -> pa.Array:
        padded = np.zeros(n_blocks * body, dtype=dtype)
        padded[:total] = values
        grid = np.concatenate([np.full((n_blocks, 1), first, dtype=dtype), padded.reshape(n_blocks, body),
                               np.full((n_blocks, 1), last, dtype=dtype)], axis=1)
        # the last block: move its closing token right after its real tokens, drop the padding
        tail = lengths[-1]
        grid[-1, tail - 1] = last
        keep = np.arange(body + 2)[None, :] < lengths[:, None]
        flat = grid[keep]
        offs = np.zeros(n_blocks + 1, dtype=np.int32)
        offs[1:] = np.cumsum(lengths)
        return pa.ListArray.from_arrays(pa.array(offs), pa.array(flat))

    columns = {"input_ids": wrap(stream, cls_id, sep_id, np.int32),
               "attention_mask": wrap(np.ones(total, dtype=np.int8), 1, 1, np.int8),
               "length": pa.array(lengths)}
    if with_word_start:
        ws_blocks = wrap(ws_stream, 1, 1, np.int8)
        # a block's first body token starts a word, even when its word began in the previous block
        ws_flat = ws_blocks.flatten().to_numpy(zero_copy_only=False).copy()
        block_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        ws_flat[block_starts[lengths > 2] + 1] = 1
        columns["word_start"] = pa.ListArray.from_arrays(ws_blocks.offsets, pa.array(ws_flat))
    return datasets.Dataset(pa.table(columns))


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------

def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, probability: float, mask_id: int,
                vocab_size: int, word_start: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels with -100 where nothing is predicted) for a (batch, length) tensor.

    `special` marks tokens never masked (special tokens and padding). With `word_start`, each token
    takes the random draw of the first token of its word, so words are masked whole."""
    shape, dev = input_ids.shape, input_ids.device
    draw = torch.rand(shape, generator=generator, device=dev)
    if word_start is not None:
        pos = torch.arange(shape[-1], device=dev).expand(shape)
        first = torch.where(word_start.bool(), pos, torch.zeros_like(pos)).cummax(dim=-1).values
        draw = draw.gather(-1, first)
    selected = (draw < probability) & ~special
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    how = torch.rand(shape, generator=generator, device=dev)
    to_mask = selected & (how < 0.8)
    to_random = selected & (how >= 0.8) & (how < 0.9)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=dev, dtype=input_ids.dtype)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def fixed_eval_masks(dataset, special_ids: Sequence[int], probability: float, mask_id: int, vocab_size: int,
                     seed: int, whole_word: bool):
    """The evaluation set with its masks drawn once (one generator over all tokens, seeded): the same
    positions every epoch, every run and any number of processes, so perplexities compare."""
    import datasets

    ids, offsets = _flat(dataset, "input_ids")
    ids_t = torch.from_numpy(ids.astype(np.int64))[None, :]
    special = torch.isin(ids_t, torch.tensor(sorted(set(special_ids)), dtype=torch.long))
    ws = None
    if whole_word:
        ws_np, _ = _flat(dataset, "word_start")
        ws = torch.from_numpy(ws_np.astype(np.int64))[None, :]
    gen = torch.Generator().manual_seed(seed)
    masked, labels = mask_tokens(ids_t, special, probability, mask_id, vocab_size, ws, gen)
    offs = pa.array(offsets.astype(np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(offs, pa.array(masked[0].numpy().astype(np.int32))),
                      "labels": pa.ListArray.from_arrays(offs, pa.array(labels[0].numpy().astype(np.int32))),
                      "attention_mask": dataset.data.column("attention_mask").combine_chunks(),
                      "length": dataset.data.column("length").combine_chunks()})
    return datasets.Dataset(table), int((labels != -100).sum())


# ---------------------------------------------------------------------------------------------
# The decoder only where it is needed
# ---------------------------------------------------------------------------------------------

# Masked positions are padded to a multiple of this many rows: a handful of distinct decoder shapes
# instead of one per batch. With ~130 different sizes per epoch, glibc's allocator fragmented until
# peak RSS reached 7 GB on WikiText-2 (MiniLM, 3 epochs); bucketed, it stays flat. Costs <5% of the
# decoder's work (the padded rows are ignored by the loss).
POSITION_BUCKET = 64


def masked_positions(labels: torch.Tensor, bucket: int = POSITION_BUCKET) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the (batch*length) positions, their targets) for every predicted token,
    padded with position 0 and target -100 up to a multiple of `bucket`."""
    flat = labels.reshape(-1)
    index = (flat != -100).nonzero().squeeze(1)
    extra = -len(index) % bucket
    if extra:
        index = torch.cat([index, index.new_zeros(extra)])
    targets = flat[index]
    if extra:
        targets[-extra:] = -100
    return index, targets


class MaskedPositionsOnly:
    """Runs the MLM head (transform + vocabulary decoder) on masked positions only.

    A forward hook on the encoder (`model.base_model`) replaces its last hidden state (batch, length,
    hidden) by the hidden states at the flat `index` (1, n, hidden) while `index` is set; the model's
    own head then returns logits (1, n, vocab). Works for any *ForMaskedLM whose head reads the
    encoder output, and through DDP/FSDP wrappers (the hook lives on the module)."""

    def __init__(self, model):
        self.index: Optional[torch.Tensor] = None
        self.handle = model.base_model.register_forward_hook(self._hook)

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index).unsqueeze(0)

    def _hook(self, module, inputs, output):
        if self.index is None:
            return None
        if isinstance(output, tuple):
            return (self._select(output[0]),) + tuple(output[1:])
        output["last_hidden_state"] = self._select(output["last_hidden_state"])
        return output

    def remove(self) -> None:
        self.handle.remove()


def head_is_new(model, new_weights: Sequence[str]) -> list[str]:
    """The newly initialised weights outside the encoder (an MLM head the checkpoint did not have)."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    return [k for k in new_weights if not k.startswith(prefix)]


def decoder_tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


# ---------------------------------------------------------------------------------------------
# Keeping the pre-trained pooler for the classifier that starts from this model
# ---------------------------------------------------------------------------------------------

def _source_file(model_args) -> Optional[str]:
    name = model_args.model
    if os.path.isdir(name):
        path = os.path.join(name, "model.safetensors")
        return path if os.path.isfile(path) else None
    try:
        from transformers.utils import cached_file

        return cached_file(name, "model.safetensors", revision=model_args.revision, cache_dir=model_args.cache_dir,
                           _raise_exceptions_for_missing_entries=False)
    except Exception:
        return None


def carry_pooler(model_args, unexpected: Sequence[str], prefix: str, output_dir: str) -> list[str]:
    """*ForMaskedLM models have no pooler, so saving one drops the checkpoint's pre-trained pooler and
    a classifier started from the output would get a random one. Copy those tensors from the source
    checkpoint into the saved model.safetensors (a masked-LM load ignores them). Returns the keys written."""
    keys = [k for k in unexpected if ".pooler." in f".{k}"]
    src, dst = _source_file(model_args), os.path.join(output_dir, "model.safetensors")
    if not keys or not src or not os.path.isfile(dst):
        return []
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(src, framework="pt") as fh:
        present = set(fh.keys())
        extra = {(k if k.startswith(prefix + ".") else f"{prefix}.{k}"): fh.get_tensor(k) for k in keys if k in present}
    if not extra:
        return []
    tensors = load_file(dst)
    tensors.update({k: v.contiguous() for k, v in extra.items() if k not in tensors})
    tmp = dst + ".tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    honour_umask(tmp)  # safetensors writes mode 0600
    os.replace(tmp, dst)
    return sorted(extra)
