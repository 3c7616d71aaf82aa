"""TinyBERT's data augmentation: word-level variants of training text, for a teacher to label (docs/distillation.md).

For every word of a sentence the augmenter finds up to `top_k` candidate replacements, once:
- a word the masked LM's tokenizer keeps as one piece: the masked LM's top predictions with that word masked
  (one masked copy of the sentence per word, TinyBERT's way; with `passes` P, P copies per sentence, copy p masking
  its one-piece words p, p + P, p + 2P, ...: about 1/P of the words masked together, P/words the cost; the LM head
  applied at the masked positions only);
- any other word (several pieces): its nearest neighbours by cosine similarity in the masked LM's input
  embeddings (the word's vector is the mean of its pieces'), among the vocabulary's whole-word tokens;
- words without a letter or digit (punctuation) are never replaced; a word with letters gets candidates with
  letters, a number candidates with digits.
A variant then replaces each word that has candidates with probability `prob` by one of them, drawn uniformly;
`n` variants are drawn per example, duplicates of the original or of each other are dropped. The draw is seeded
by --augment_seed and the example's own words (never its position or the process that
builds it), so a seed gives the same variants on any number of processes and for any selection of the rows. A
replacement keeps the original's capitalisation (first letter, or all capitals) and is always one word for one
word, so word-level labels (NER) stay aligned.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

Words = list  # list[str]: one sentence as words


def is_word(word: str) -> bool:
    """A word that may be replaced: it has a letter or a digit."""
    return any(ch.isalnum() for ch in word)


def same_kind(candidate: str, original: str) -> bool:
    """A number is replaced by a number, a word with letters by a word with letters (no '1998' -> 'rome')."""
    if any(ch.isalpha() for ch in original):
        return any(ch.isalpha() for ch in candidate)
    return any(ch.isdigit() for ch in candidate)


def match_case(candidate: str, original: str) -> str:
    if len(original) > 1 and original.isupper():
        return candidate.upper()
    if original[:1].isupper():
        return candidate[:1].upper() + candidate[1:]
    return candidate


def row_seed(seed: int, fields: Sequence[Words]) -> list[int]:
    """The draw's seed for one example: `seed` and a hash of the example's words."""
    h = hashlib.blake2b("\x1e".join("\x1f".join(words) for words in fields).encode("utf-8"), digest_size=8)
    return [int(seed) & 0xFFFFFFFF, int.from_bytes(h.digest(), "little")]


def draw_variants(fields: Sequence[Words], candidates: Sequence[Sequence[Sequence[str]]], n: int, prob: float,
                  seed: int) -> list[list[Words]]:
    """Up to n variants of one example (each a list of fields, each a list of words); `candidates[f][i]` are word
    i of field f's replacements. Every field of a variant is drawn in the same pass (sentence pairs side by side)."""
    rng = np.random.default_rng(row_seed(seed, fields))
    seen = {tuple(tuple(w) for w in fields)}
    out = []
    for _ in range(n):
        variant = []
        for words, cands in zip(fields, candidates):
            new = list(words)
            draws = rng.random(len(words))
            picks = rng.integers(0, 1 << 30, len(words))
            for i, c in enumerate(cands):
                if c and draws[i] < prob:
                    new[i] = match_case(c[picks[i] % len(c)], words[i])
            variant.append(new)
        key = tuple(tuple(w) for w in variant)
        if key not in seen:
            seen.add(key)
            out.append(variant)
    return out


@dataclass
class Vocabulary:
    """Which tokens of the masked LM's vocabulary can stand as a whole word, and the words they spell."""
    valid: torch.Tensor   # (vocab,) bool
    words: list           # token id -> word ("" where not valid)


def word_start_marker(tokenizer) -> str:
    """How the vocabulary marks a word's first piece: 'Ġ' (byte-level BPE: RoBERTa, GPT-2), '▁' (SentencePiece:
    ALBERT, XLM-R, DeBERTa-v3), or '' (WordPiece, which marks the other pieces with '##' instead)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else ""
    return "Ġ" if '"ByteLevel"' in spec else "▁" if '"Metaspace"' in spec else ""


def word_vocabulary(tokenizer) -> Vocabulary:
    """Whole-word tokens: not special, not a word continuation (WordPiece '##x'; with a BPE/SentencePiece
    vocabulary, tokens without the word-start marker), with a letter or a digit."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    tokens = [""] * size
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(tokenizer.all_special_ids)
    marker = word_start_marker(tokenizer)
    valid, words = torch.zeros(size, dtype=torch.bool), [""] * size
    for i, tok in enumerate(tokens):
        if i in special or not tok or tok.startswith("##") or (tok.startswith("[") and tok.endswith("]")):
            continue
        if marker:
            if not tok.startswith(marker):
                continue
            tok = tokenizer.convert_tokens_to_string([tok]).strip()  # bytes decoded: 'ĠcafÃ©' is 'café'
        if tok and is_word(tok) and not any(ch.isspace() for ch in tok):
            valid[i], words[i] = True, tok
    return Vocabulary(valid, words)


class Augmenter:
    """Candidate replacements from a masked LM (see the module docstring). `model`: an *ForMaskedLM in eval mode on
    its device; `autocast`: the run's autocast context factory."""

    def __init__(self, model, tokenizer, top_k: int, autocast: Callable = None, tokens_per_batch: int = 8192,
                 max_length: int = 128, passes: int = 0):
        import contextlib

        self.model, self.tokenizer, self.top_k = model, tokenizer, top_k
        self.passes = passes  # 0: one masked copy per word (TinyBERT); P: P copies, word j masked in copy j mod P
        self.autocast = autocast or contextlib.nullcontext
        self.tokens_per_batch, self.max_length = tokens_per_batch, max_length
        self.device = next(model.parameters()).device
        self.vocab = word_vocabulary(tokenizer)
        self.valid = self.vocab.valid.to(self.device)
        self.words = self.vocab.words
        self.head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
        self._neighbours: dict[str, list] = {}
        self._unit = None
        self.stats = {"sentences": 0, "words": 0, "masked_lm": 0, "masked_copies": 0, "embedding": 0, "none": 0}

    def _valid(self, n: int) -> torch.Tensor:
        """Which of the first n ids are words; n, the model's vocabulary, may exceed the tokenizer's (embeddings
        padded to a multiple of 64, as in ModernBERT): the ids past the tokenizer's are not words."""
        valid = self.valid[:n]
        return valid if len(valid) == n else torch.cat([valid, valid.new_zeros(n - len(valid))])

    def _word(self, token_id: int) -> str:
        return self.words[token_id] if token_id < len(self.words) else ""

    # -- masked LM --------------------------------------------------------------------------------------------
    def _mlm_logits(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                    rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Vocabulary logits at (rows[i], positions[i]) (default: one position per row); the head runs at those
        positions only when the model exposes it (BERT's `cls`, RoBERTa's `lm_head`)."""
        rows = torch.arange(len(positions), device=self.device) if rows is None else rows
        if self.head is not None:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            return self.head(hidden[rows, positions]).float()
        return self.model(input_ids=input_ids, attention_mask=attention).logits[rows, positions].float()

    def _mlm_candidates(self, jobs: list) -> list[list[list[str]]]:
        """jobs: (token ids of the sentence, positions to mask together, their original words); returns each job's
        candidates per position."""
        mask_id = self.tokenizer.mask_token_id
        out: list = [None] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][0]))
        start = 0
        while start < len(order):
            width = len(jobs[order[start]][0])
            size = max(1, self.tokens_per_batch // max(width, 1))
            chunk = order[start:start + size]
            start += size
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            rows, pos = [], []
            for r, j in enumerate(chunk):
                seq, positions, _ = jobs[j]
                ids[r, :len(seq)] = torch.tensor(seq)
                att[r, :len(seq)] = 1
                ids[r, positions] = mask_id
                rows.extend([r] * len(positions))
                pos.extend(positions)
            with torch.inference_mode(), self.autocast():
                logits = self._mlm_logits(ids.to(self.device), att.to(self.device),
                                          torch.tensor(pos, device=self.device), torch.tensor(rows, device=self.device))
            logits = logits.masked_fill(~self._valid(logits.shape[-1]), float("-inf"))
            top = iter(logits.topk(min(2 * self.top_k + 5, logits.shape[-1]), dim=-1).indices.cpu().tolist())
            for j in chunk:
                out[j] = []
                for word in jobs[j][2]:
                    words = [self._word(t) for t in next(top)]
                    out[j].append([w for w in dict.fromkeys(words) if w and w.lower() != word.lower()
                                   and same_kind(w, word)][: self.top_k])
        return out

    # -- embedding neighbours ---------------------------------------------------------------------------------
    def _neighbours_of(self, words: list[str]) -> None:
        """Fill the cache with the nearest whole-word tokens of each new word (mean of its pieces' embeddings)."""
        new = [w for w in dict.fromkeys(words) if w not in self._neighbours]
        if not new:
            return
        emb = self.model.get_input_embeddings().weight.detach()
        if self._unit is None:
            unit = torch.nn.functional.normalize(emb.float(), dim=-1)
            self._unit = unit.masked_fill(~self._valid(len(unit)).unsqueeze(1), 0.0)
        for start in range(0, len(new), 512):
            part = new[start:start + 512]
            pieces = [self.tokenizer(w, add_special_tokens=False)["input_ids"] or [self.tokenizer.unk_token_id]
                      for w in part]
            vec = torch.stack([emb[torch.tensor(p, device=emb.device)].float().mean(0) for p in pieces])
            sims = torch.nn.functional.normalize(vec, dim=-1) @ self._unit.T
            for r, p in enumerate(pieces):  # never the word's own pieces
                sims[r, torch.tensor(p, device=sims.device)] = float("-inf")
            sims = sims.masked_fill(~self._valid(sims.shape[-1]), float("-inf"))
            top = sims.topk(min(2 * self.top_k + 5, sims.shape[-1]), dim=-1).indices.cpu().tolist()
            for w, t in zip(part, top):
                cands = [self._word(i) for i in t]
                self._neighbours[w] = [c for c in dict.fromkeys(cands)
                                       if c and c.lower() != w.lower() and same_kind(c, w)][: self.top_k]

    # -- per sentence -----------------------------------------------------------------------------------------
    def candidates(self, sentences: Sequence[Words]) -> list[list[list[str]]]:
        """For each sentence, each word's candidate replacements ([] for words that are not replaced)."""
        enc = self.tokenizer([list(s) for s in sentences], is_split_into_words=True, truncation=True,
                             max_length=self.max_length)
        jobs, where, multi = [], [], []
        result = [[[] for _ in s] for s in sentences]
        for k, words in enumerate(sentences):
            self.stats["sentences"] += 1
            self.stats["words"] += len(words)
            word_ids = enc.word_ids(k)
            spans: dict[int, list[int]] = {}
            for p, w in enumerate(word_ids):
                if w is not None:
                    spans.setdefault(w, []).append(p)
            single = []
            for i, word in enumerate(words):
                if not is_word(word):
                    continue
                if len(spans.get(i, ())) == 1:
                    single.append(i)
                else:  # several pieces (or cut off by truncation): embedding neighbours
                    multi.append((k, i))
            groups = ([[i] for i in single] if not self.passes
                      else [single[p::self.passes] for p in range(min(self.passes, len(single)))])
            for group in groups:  # one masked copy of the sentence per group
                jobs.append((enc["input_ids"][k], [spans[i][0] for i in group], [words[i] for i in group]))
                where.append([(k, i) for i in group])
        for places, cands in zip(where, self._mlm_candidates(jobs)):
            for (k, i), c in zip(places, cands):
                result[k][i] = c
        self._neighbours_of([sentences[k][i] for k, i in multi])
        for k, i in multi:
            result[k][i] = self._neighbours[sentences[k][i]]
        masked = sum(len(w) for w in where)
        self.stats["masked_lm"] += masked
        self.stats["masked_copies"] += len(jobs)
        self.stats["embedding"] += len(multi)
        self.stats["none"] += sum(len(s) for s in sentences) - masked - len(multi)
        return result

    def augment(self, rows: Sequence[Sequence[Words]], n: int, prob: float, seed: int,
                rows_candidates: Optional[list] = None) -> list[list[list[Words]]]:
        """Variants of each row (a list of fields, each a list of words): per row, a list of variants."""
        flat = [words for fields in rows for words in fields]
        cands = self.candidates(flat) if rows_candidates is None else rows_candidates
        out, k = [], 0
        for fields in rows:
            mine = cands[k:k + len(fields)]
            k += len(fields)
            out.append(draw_variants(fields, mine, n, prob, seed))
        return out
