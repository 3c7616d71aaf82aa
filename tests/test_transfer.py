"""Distillation's transfer set (common/data/augment.py, common/training/transfer.py): TinyBERT's word-level
augmentation on the tiny masked LM, the unlabelled-text readers, the flags' refusals, the hard loss on gold rows
only, and end-to-end runs (the caches across seeds and folds, exact resume, two processes). The teachers are random
BERTs: these tests check the mechanics, not that distillation helps."""
from __future__ import annotations

import json
import os
import random
import re
import sys
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from test_distill import NER_LABELS, SHORT, cls_argv, ner_argv, save_teacher
from test_ner import toy_ner_sentence, write_conll

import train_cls
import train_ner
from common.config import ModelArguments, TrainArguments
from common.data import labels, ner
from common.data.augment import Augmenter, draw_variants, same_kind, word_start_marker, word_vocabulary
from common.errors import UserError, run_cli
from common.training import distill, transfer
from conftest import FILLER, SPLIT_WORDS, preempted, run_script, toy_sentence, write_csv

PUNCT = {",", ".", "!", "?", "-", "(", ")", "'"}


@pytest.fixture(scope="module")
def mlm(tiny_model):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    return AutoModelForMaskedLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def toy_rows(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [[toy_sentence(rng, rng.randint(0, 1)).split()] for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Drawing variants
# ---------------------------------------------------------------------------------------------

def test_variants_are_seeded_by_their_words_never_by_position_or_selection(mlm):
    aug = Augmenter(*mlm, top_k=5)
    rows = toy_rows(12) + [[["Alice", "saw", "a", "GOOD", "film", ",", "really", "!"]]]
    every = aug.augment(rows, 6, 0.5, seed=3)
    assert every == aug.augment(rows, 6, 0.5, seed=3)
    assert aug.augment(rows[::-1], 6, 0.5, seed=3) == every[::-1]  # candidates batched otherwise: the same
    assert aug.augment(rows[5:7], 6, 0.5, seed=3) == every[5:7]
    assert aug.augment(rows, 6, 0.5, seed=4) != every
    assert sum(len(v) for v in every) > 6 * len(rows) * 0.9


def test_variants_keep_punctuation_case_and_length_and_are_new(mlm):
    aug = Augmenter(*mlm, top_k=8)
    first = ["Alice", "saw", "the", "UNBELIEVABLE", "film", ",", "and", "Bob", "liked", "it", "."]
    second = ["Was", "it", "playing", "in", "PARIS", "?"]
    (variants,) = aug.augment([[first, second]], 12, 0.6, seed=0)
    assert 8 <= len(variants) <= 12
    assert len({json.dumps(v) for v in variants}) == len(variants) and [first, second] not in variants
    both = 0
    for fields in variants:
        assert len(fields) == 2  # a pair: one variant holds both sentences, drawn together
        both += fields[0] != first and fields[1] != second
        for new, old in zip(fields, (first, second)):
            assert len(new) == len(old)  # one word for one word
            for w, o in zip(new, old):
                if o in PUNCT:
                    assert w == o
                elif w != o:
                    assert " " not in w and w.lower() != o.lower()
                    if len(o) > 1 and o.isupper():
                        assert w.isupper() or not w.isalpha(), (o, w)
                    elif o[0].isupper():
                        assert w[0].isupper() or not w[0].isalpha(), (o, w)
                    else:
                        assert w == w.lower()
    assert both >= len(variants) // 2  # side by side: most variants change both sentences


def test_prob_is_the_share_of_replaced_words_and_duplicates_are_dropped():
    """Each word is replaced with probability prob; a draw that replaced nothing is the original and is dropped,
    so the kept variants replace prob / (1 - (1 - prob) ** words) of their words (0.402 and 0.153 here)."""
    rng = random.Random(1)
    rows = [[rng.choice(FILLER) for _ in range(10)] for _ in range(300)]
    cands = [[[f"x{i}{j}" for j in range(10)] for i in range(10)] for _ in rows]
    for prob, tolerance in ((0.4, 0.05), (0.1, 0.02)):
        changed = total = 0
        for words, c in zip(rows, cands):
            for (v,) in draw_variants([words], [c], 4, prob, seed=0):
                changed += sum(a != b for a, b in zip(v, words))
                total += len(words)
        assert abs(changed / total - prob / (1 - (1 - prob) ** 10)) < tolerance, (prob, changed / total)
    # two candidates, one word: at most two distinct variants, never the original
    assert sorted(draw_variants([["good"]], [[["nice", "fine"]]], 20, 0.9, seed=0)) == [[["fine"]], [["nice"]]]
    assert draw_variants([["good", "."]], [[[], []]], 5, 1.0, seed=0) == []  # nothing to replace: no variant


# ---------------------------------------------------------------------------------------------
# Candidates from the masked LM
# ---------------------------------------------------------------------------------------------

def byte_level_tokenizer(path, words: list, vocab_size: int):
    """A RoBERTa-style byte-level BPE tokenizer trained on filler text with `words`, saved to `path`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    rng = random.Random(0)
    bpe.train_from_iterator([" ".join(rng.choice(FILLER + words) for _ in range(8)) for _ in range(200)],
                            vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                               cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    tok.save_pretrained(path)
    return tok


def test_word_vocabulary_holds_whole_words_only(tmp_path):
    from transformers import AutoTokenizer, BertTokenizerFast

    from conftest import _vocab

    bert = BertTokenizerFast(vocab={w: i for i, w in enumerate(_vocab() + ["[unused0]", "[unused1]"])},
                             do_lower_case=True)
    vocab = word_vocabulary(bert)
    words = {w for w in vocab.words if w}
    assert {"good", "paris", "un", "play", "a", "7"} <= words
    assert not words & {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "##a", "##able", ".", ",", "-"}
    assert word_start_marker(bert) == "" and vocab.valid.sum() == len(words)

    # byte-level BPE: only pieces that start a word ('Ġ'), bytes decoded ('ĠcafÃ©' -> 'café')
    byte_level_tokenizer(tmp_path, ["café", "unbelievable"], 400)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    words = {w for w in word_vocabulary(tok).words if w}
    assert word_start_marker(tok) == "Ġ" and {"café", "unbelievable", "movie"} <= words
    assert not any("Ġ" in w or "Ã" in w or w.startswith("<") for w in words), words
    assert len(words) < 0.2 * len(tok)  # the byte alphabet and the pieces inside words are not words


def test_candidates_masked_lm_for_one_piece_words_embedding_neighbours_for_split_words(mlm):
    model, tok = mlm
    k = 5
    aug = Augmenter(model, tok, top_k=k, tokens_per_batch=40)  # several batches of masked copies
    words = ["the", "unbelievable", "film", ",", "was", "rewriting", "playing", "good", "."]
    (got,) = aug.candidates([words])
    vocab = word_vocabulary(tok)
    assert got[3] == [] and got[8] == []  # punctuation: never replaced
    assert aug.stats == {"sentences": 1, "words": 9, "masked_lm": 4, "masked_copies": 4, "embedding": 3, "none": 2}

    enc = tok(words, is_split_into_words=True, return_tensors="pt")
    pieces = {}
    for p, w in enumerate(enc.word_ids()):
        if w is not None:
            pieces.setdefault(w, []).append(p)
    for i in (0, 2, 4, 7):  # one piece: the masked LM's top words at that position, the word itself left out
        ids = enc["input_ids"].clone()
        ids[0, pieces[i][0]] = tok.mask_token_id
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=enc["attention_mask"]).logits[0, pieces[i][0]]
            head = aug._mlm_logits(ids, enc["attention_mask"], torch.tensor(pieces[i][:1]))[0]
        torch.testing.assert_close(head, full, rtol=1e-5, atol=1e-5)  # the head at the masked position only
        order = full.masked_fill(~vocab.valid, float("-inf")).argsort(descending=True).tolist()
        expected = [vocab.words[t] for t in order  # a word gets words, a number numbers
                    if vocab.words[t] and vocab.words[t] != words[i] and same_kind(vocab.words[t], words[i])][:k]
        assert got[i] == expected, (words[i], got[i], expected)
    emb = model.get_input_embeddings().weight.detach()
    for i, word in ((1, "unbelievable"), (5, "rewriting"), (6, "playing")):
        assert word in SPLIT_WORDS and len(pieces[i]) > 1
        own = tok(word, add_special_tokens=False)["input_ids"]
        sims = torch.nn.functional.cosine_similarity(emb[own].mean(0, keepdim=True), emb, dim=-1)
        sims = sims.masked_fill(~vocab.valid, float("-inf"))
        sims[own] = float("-inf")
        expected = [vocab.words[t] for t in sims.argsort(descending=True).tolist()
                    if same_kind(vocab.words[t], word)][:k]
        assert got[i] == expected and word not in got[i], (word, got[i], expected)
    assert all(len(c) == k for i, c in enumerate(got) if i not in (3, 8))


def test_passes_mask_every_pth_word_together_and_enough_passes_equal_one_copy_per_word(mlm):
    model, tok = mlm
    words = ["the", "film", "was", "good", "and", "the", "music", "great", "."]
    exact = Augmenter(model, tok, top_k=5).candidates([words])
    assert Augmenter(model, tok, top_k=5, passes=50).candidates([words]) == exact  # one word per copy again
    two = Augmenter(model, tok, top_k=5, passes=2)
    (got,) = two.candidates([words])
    assert two.stats["masked_copies"] == 2 and two.stats["masked_lm"] == 8 and got[8] == []
    enc = tok(words, is_split_into_words=True, return_tensors="pt")
    ids = enc["input_ids"].clone()
    ids[0, [1, 3, 5, 7]] = tok.mask_token_id  # copy 0: words 0, 2, 4, 6 (tokens 1, 3, 5, 7) masked together
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=enc["attention_mask"]).logits[0]
    vocab = word_vocabulary(tok)
    for i, p in ((0, 1), (2, 3), (4, 5), (6, 7)):
        order = logits[p].masked_fill(~vocab.valid, float("-inf")).argsort(descending=True).tolist()
        expected = [vocab.words[t] for t in order
                    if vocab.words[t] and vocab.words[t] != words[i] and same_kind(vocab.words[t], words[i])][:5]
        assert got[i] == expected, (words[i], got[i], expected)


def test_a_model_vocabulary_larger_than_the_tokenizer_never_proposes_the_padding_ids(tiny_model):
    """Embeddings padded past the tokenizer (ModernBERT: 50368 rows for 50280 tokens) are not words."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = AutoConfig.from_pretrained(tiny_model, vocab_size=len(tok) + 7)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tok):] *= 50  # the padding rows would win every comparison
    (got,) = Augmenter(model, tok, top_k=4).candidates([["the", "unbelievable", "film", "was", "good"]])
    known = set(tok.get_vocab())
    assert all(len(c) == 4 and set(c) <= known for c in got), got


def aug_ctx(model_dir, teacher=None, augment=None, top_k=4):
    from accelerate import Accelerator

    args = SimpleNamespace(augment_model=augment, teacher_model=teacher, augment_top_k=top_k, augment_passes=0)
    return SimpleNamespace(args=args, model_args=ModelArguments(model=model_dir), accelerator=Accelerator(cpu=True))


def test_augment_model_a_byte_level_masked_lm_sees_each_word_with_its_leading_space(tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM

    tok = byte_level_tokenizer(tmp_path, ["alice", "paris"], 350)
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=40,
                                     pad_token_id=1)).save_pretrained(tmp_path)
    aug = transfer.load_augmenter(aug_ctx(str(tmp_path), augment=str(tmp_path)))
    assert aug.head is not None  # RoBERTa's lm_head, at the masked positions only
    pieces = aug.tokenizer(["alice", "saw", "paris"], is_split_into_words=True).tokens()
    assert pieces[1] == "Ġalice" and pieces[-2] == "Ġparis", pieces  # as inside a text, not as its first word
    (got,) = aug.candidates([["alice", "saw", "the", "film"]])
    assert all(len(c) == 4 for c in got) and all(re.fullmatch(r"[a-z]+", w) for c in got for w in c), got


def test_augment_model_without_a_masked_lm_head_is_refused_naming_the_flag(tiny_model, tmp_path):
    teacher = save_teacher(tmp_path / "t", tiny_model)
    for augment, who in ((None, "the teacher --teacher_model"), (teacher, "--augment_model")):
        with pytest.raises(UserError) as err:
            transfer.load_augmenter(aug_ctx(tiny_model, teacher=teacher, augment=augment))
        text = str(err.value)
        assert f"{who} '{teacher}' has no trained MLM head (cls.predictions." in text, text
        assert "pass --augment_model with one" in text


# ---------------------------------------------------------------------------------------------
# Flags and unlabelled files
# ---------------------------------------------------------------------------------------------

def test_flag_refusals():
    for kw, msg in (({"teacher_model": "t", "augment_top_k": 5},
                     "--augment_top_k only applies with --distill_augment N"),
                    ({"teacher_model": "t", "augment_model": "m", "augment_prob": 0.2},
                     "--augment_model, --augment_prob only apply with --distill_augment N"),
                    ({"distill_augment": 3}, "--distill_augment only adds rows for a teacher to label"),
                    ({"teacher_model": "t", "augment_seed": 3}, "--augment_seed only applies with --distill_augment"),
                    ({"teacher_model": "t", "augment_passes": 4}, "--augment_passes only applies with"),
                    ({"teacher_model": "t", "distill_augment": 2, "augment_passes": -1}, "--augment_passes must be >="),
                    ({"distill_unlabeled_file": "u.csv"}, "--distill_unlabeled_file only adds rows for a teacher"),
                    ({"teacher_model": "t", "distill_augment": -1}, "--distill_augment must be >= 0 (got -1)"),
                    ({"teacher_model": "t", "distill_augment": 2, "augment_top_k": 0}, "--augment_top_k >= 1 (got 0)"),
                    ({"teacher_model": "t", "distill_augment": 2, "augment_prob": 0.0}, "in (0, 1] (got 0.0)"),
                    ({"teacher_model": "t", "distill_augment": 2, "augment_prob": 1.5}, "in (0, 1] (got 1.5)"),
                    ({"teacher_model": "t", "distill_augment": 2, "distill_alpha": 1.0},
                     "with --distill_alpha 1 and no intermediate loss")):
        with pytest.raises(UserError, match=re.escape(msg)):
            TrainArguments(**kw)
    TrainArguments(teacher_model="t", distill_augment=2, distill_alpha=1.0, distill_hidden=True)  # stage 1 learns
    TrainArguments(teacher_model="t", distill_unlabeled_file="u.csv", augment_prob=1.0, distill_augment=1)


def test_flag_refusal_exits_2_with_one_sentence_and_writes_nothing(tiny_model, sentiment_files, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_cli(train_cls.main, cls_argv(tiny_model, sentiment_files, out, "--distill_augment", "4"))
    assert stop.value.code == 2 and not out.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: --distill_augment only adds rows for a teacher to label: pass --teacher_model PATH.", last


UNLABELED = {  # case -> (file rows, or None: no file; the error's words)
    "no MLM head": ([("a good film",)], "--distill_augment needs a masked LM to propose replacements, but the teacher "
                                        "--teacher_model '{teacher}' has no trained MLM head"),
    "missing column": ([("a good film",)], "--distill_unlabeled_file '{path}' has no column 'sentence'"),
    "empty cell": ([("a good film",), ("",)], "--distill_unlabeled_file '{path}' row 2: column 'sentence' is empty"),
    "no rows": ([], "--distill_unlabeled_file '{path}' has a header but no rows"),
    "missing file": (None, "--distill_unlabeled_file '{path}' does not exist"),
}


@pytest.mark.parametrize("case", sorted(UNLABELED))
def test_refused_transfer_inputs_exit_2_before_anything_is_written(case, tiny_model, sentiment_files, tmp_path,
                                                                   capsys):
    rows, expected = UNLABELED[case]
    teacher = save_teacher(tmp_path / "teacher", tiny_model)
    path = str(tmp_path / "u.csv")
    if rows is not None:
        write_csv(path, ["text" if case == "missing column" else "sentence"], rows)
    out = tmp_path / "out"
    extra = ["--distill_augment", "2"] if case == "no MLM head" else ["--distill_unlabeled_file", path]
    with pytest.raises(SystemExit) as stop:
        run_cli(train_cls.main, cls_argv(tiny_model, sentiment_files, out, "--teacher_model", teacher, *extra))
    assert stop.value.code == 2 and not out.exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: " + expected.format(teacher=teacher, path=path)), last


def test_cls_unlabeled_file_pairs_and_refusals(tmp_path):
    a = train_cls.ClsDataArguments(train_file="x.csv")
    good = write_csv(tmp_path / "u.csv", ["id", "sentence1", "sentence2"],
                     [(1, "Alice's film -- wasn't good.", "It was, really"), (2, "bad", "x")])
    assert labels.read_unlabeled(good, ["sentence1", "sentence2"], a) == [
        [["Alice's", "film", "-", "-", "wasn't", "good", "."], ["It", "was", ",", "really"]], [["bad"], ["x"]]]
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"sentence": 42}\n{"sentence": "fine"}\n')
    assert labels.read_unlabeled(str(numbers), ["sentence"], a) == [[["42"]], [["fine"]]]
    cases = {
        "missing column": (write_csv(tmp_path / "c.csv", ["sentence1", "label"], [("a", 1)]),
                           "has no column 'sentence2'; it needs the training text column(s) 'sentence1', "
                           "'sentence2' (columns found: sentence1, label)"),
        "empty cell": (write_csv(tmp_path / "e.csv", ["sentence1", "sentence2"], [("a", "b"), ("c", " ")]),
                       "row 2: column 'sentence2' is empty"),
        "no rows": (write_csv(tmp_path / "h.csv", ["sentence1", "sentence2"], []), "has a header but no rows"),
        "missing file": (str(tmp_path / "nope.csv"), "nope.csv' does not exist"),
    }
    for case, (path, expected) in cases.items():
        with pytest.raises(UserError) as err:
            labels.read_unlabeled(path, ["sentence1", "sentence2"], a)
        assert expected in str(err.value) and "--distill_unlabeled_file" in str(err.value), (case, str(err.value))


def test_ner_unlabeled_file_lines_conll_or_a_table(tmp_path):
    a = train_ner.NerDataArguments(train_file="x.txt")
    rng = random.Random(5)
    sentences = [toy_ner_sentence(rng) for _ in range(6)]
    read = ner.read_unlabeled
    conll = write_conll(tmp_path / "c.txt", sentences)  # 4 columns, tags last: the tags are not read
    assert read(conll, a) == [[w] for w, _ in sentences]
    bare = tmp_path / "b.conll"  # one word per line, no tags
    bare.write_text("\n\n".join("\n".join(w) for w, _ in sentences) + "\n")
    assert read(str(bare), a) == [[w] for w, _ in sentences]
    lines = tmp_path / "l.txt"
    lines.write_text("alice went to paris .\nthe film was good\n\nbob is here , really\n")  # a blank line: skipped
    assert read(str(lines), a) == [[["alice", "went", "to", "paris", "."]], [["the", "film", "was", "good"]],
                                   [["bob", "is", "here", ",", "really"]]]
    same = tmp_path / "s.txt"  # sentences of one length are sentences too, not columns of one
    same.write_text("alice went to paris\nthe film was good\n")
    assert read(str(same), a) == [[["alice", "went", "to", "paris"]], [["the", "film", "was", "good"]]]
    one = tmp_path / "o.txt"
    one.write_text("alice went to paris\n")
    assert read(str(one), a) == [[["alice", "went", "to", "paris"]]]
    table = write_csv(tmp_path / "t.csv", ["tokens", "ner_tags"], [("alice went home", "B-PER O O"), ("ok", "O")])
    assert read(table, a) == [[["alice", "went", "home"]], [["ok"]]]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"tokens": ["New", "York"]}\n')
    assert read(str(jsonl), a) == [[["New", "York"]]]
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="holds no sentences"):
        read(str(empty), a)
    with pytest.raises(UserError, match="--distill_unlabeled_file .*nope.txt' does not exist"):
        read(str(tmp_path / "nope.txt"), a)


# ---------------------------------------------------------------------------------------------
# The hard loss on gold rows only
# ---------------------------------------------------------------------------------------------

def test_hard_loss_covers_the_gold_rows_only_and_the_soft_loss_every_row(tiny_model):
    """A transfer-set batch: rows 0 and 2 are originals (gold), 1 and 3 variants or unlabelled rows."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(0)
    ids, mask = torch.randint(5, 60, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    gold, none = torch.tensor([1, 0, 1, 0]), torch.zeros(4, dtype=torch.long)
    ce = torch.nn.functional.cross_entropy

    # classification, --distill_alpha 1 --distill_hidden (per-step teacher): the variants add no hard loss
    student = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()
    torch.manual_seed(1)
    teacher = AutoModelForSequenceClassification.from_config(student.config).eval()  # other hidden states
    base = train_cls.ClassificationObjective(False, 2)
    obj = distill.DistillObjective(base, TrainArguments(teacher_model="t", distill_alpha=1.0, distill_hidden=True),
                                   [[0, 0], [1, 1]], teacher=teacher)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([1, 0, 0, 1]), "gold": gold}
    logits = student(input_ids=ids, attention_mask=mask).logits
    hard = ce(logits[[0, 2]], batch["labels"][[0, 2]], reduction="sum")
    with torch.no_grad():
        full, soft_only = obj.loss_sum(student, batch), obj.loss_sum(student, {**batch, "gold": none})
        flipped = obj.loss_sum(student, {**batch, "labels": torch.tensor([1, 1, 0, 0])})
    torch.testing.assert_close(full, hard + soft_only)
    torch.testing.assert_close(flipped, full)  # a variant's label (its source's, or none) is never read
    assert soft_only > 0  # the intermediate loss covers every row

    # prediction KD from cached logits: the soft loss covers all rows, the hard loss the gold ones
    a, t = 0.3, 2.5
    store = distill.LogitStore(torch.randn(4, 2), torch.arange(5))
    kd = TrainArguments(teacher_model="t", distill_alpha=a, distill_temperature=t)
    obj = distill.DistillObjective(base, kd, [], store=store)
    batch["example_index"] = torch.tensor([2, 0, 3, 1])
    p = torch.softmax(store.values[batch["example_index"]] / t, -1)
    kl = (p * (p.log() - torch.log_softmax(logits / t, -1))).sum()
    with torch.no_grad():
        torch.testing.assert_close(obj.loss_sum(student, {**batch, "gold": none}), (1 - a) * t * t * kl)
        torch.testing.assert_close(obj.loss_sum(student, batch), a * hard + (1 - a) * t * t * kl)

    # NER: the gold sentences' labelled positions get the hard loss; every row's labelled positions the soft one
    tagger = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=3).eval()
    labels = torch.tensor([[-100, 1, 0, -100, 2, -100], [-100, 2, 2, -100, -100, -100],
                           [-100, 0, -100, -100, -100, -100], [-100, 1, 1, 1, -100, -100]])
    items = labels != -100
    store = distill.LogitStore(torch.randn(int(items.sum()), 3), torch.tensor([0, 3, 5, 6, 9]))
    ner_base = train_ner.NerObjective(train_ner.NerState(["O", "B-X", "I-X"], [], [], np.zeros(1)), None)
    obj = distill.DistillObjective(ner_base, kd, [], store=store)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "gold": gold,
             "example_index": torch.arange(4)}
    logits = tagger(input_ids=ids, attention_mask=mask).logits
    p = torch.softmax(store.values / t, -1)
    kl = (p * (p.log() - torch.log_softmax(logits[items] / t, -1))).sum()
    keep = items & gold.bool().unsqueeze(1)
    hard = ce(logits[keep], labels[keep], reduction="sum")
    with torch.no_grad():
        torch.testing.assert_close(obj.loss_sum(tagger, batch), a * hard + (1 - a) * t * t * kl)
    assert obj.count_items(batch) == items.sum()  # the loop divides by every row's items


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def variants_table(info: dict):
    return pq.read_table(os.path.join(transfer.cache_folder(), f"variants-{info['augment']['key']}.parquet"))


def test_cls_transfer_set_cached_across_seeds_and_resumed_exactly(tiny_model, sentiment_files, tmp_path, capsys,
                                                                 monkeypatch):
    """Seed 1 builds the variants, tokenizes and labels them; seed 2 reuses all three; an interrupted seed-1 run
    resumes to the uninterrupted one's weights. The unlabelled rows and the variants are in every epoch."""
    teacher = save_teacher(tmp_path / "teacher", tiny_model, seed=11)  # its own: nothing cached yet
    rng = random.Random(9)
    unlabeled = write_csv(tmp_path / "u.csv", ["sentence"], [(toy_sentence(rng, i % 2),) for i in range(30)])
    kd = ["--teacher_model", teacher, "--distill_augment", "4", "--augment_model", tiny_model, "--augment_top_k", "6",
          "--distill_unlabeled_file", unlabeled, "--max_steps", "6", "--checkpointing_steps", "3",
          "--eval_strategy", "no", "--learning_rate", "1e-3"]
    capsys.readouterr()
    first = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "a", *kd, "--seed", "1"))
    log = capsys.readouterr().err
    d = first["distillation"]
    info = d["transfer"]
    assert info["pool_examples"] == info["originals"] == 240 and info["unlabeled_rows"] == 30
    assert 4 * 240 * 0.9 < info["variants"] <= 4 * 240 == info["augment"]["n"] * 240
    assert info["rows_per_epoch"] == info["pool_rows"] == 240 + info["variants"] + 30
    assert info["cache_hits"] == {"variants": False, "tokenized": False} and d["cache"]["hit"] is False
    assert d["cache"]["items"] == info["rows_per_epoch"]  # the teacher labelled every row
    for key in ("build_seconds", "tokenize_seconds", "label_seconds", "tokenized_mb", "logits_mb"):
        assert isinstance(info[key], float), key
    aug = info["augment"]
    assert aug["model"] == tiny_model and aug["top_k"] == 6 and aug["prob"] == 0.4 and aug["file_mb"] >= 0
    assert aug["words"] == aug["words_from_masked_lm"] + aug["words_from_embeddings"] + aug["words_never_replaced"]
    assert aug["words_from_masked_lm"] > 0 and info["unlabeled"]["rows"] == 30
    assert first["train"]["train_samples"] == info["rows_per_epoch"]
    line = f"transfer set: 240 original rows + {info['variants']} variants + 30 unlabelled rows = " \
           f"{info['rows_per_epoch']} rows per epoch"
    assert line in log, log[-3000:]
    samples = (tmp_path / "a" / transfer.SAMPLES).read_text()
    assert samples.count("original sentence: ") == 12 and "variant 4 sentence: " in samples
    assert re.search(r"variant 1 sentence: .*\[\w+\]", samples), samples[:500]
    table = variants_table(info)
    assert table.num_rows == info["variants"] and table.column_names == ["source", "variant", "field_0"]

    second = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "b", *kd, "--seed", "2"))
    assert second["distillation"]["transfer"]["cache_hits"] == {"variants": True, "tokenized": True}
    assert second["distillation"]["cache"] == {**d["cache"], "hit": True}  # the teacher labels once
    assert second["distillation"]["transfer"]["augment"]["key"] == aug["key"]
    other = train_cls.main(cls_argv(tiny_model, sentiment_files, tmp_path / "c", *kd, "--augment_seed", "5",
                                    "--max_steps", "1"))  # another draw: new variants, labelled again
    assert other["distillation"]["transfer"]["cache_hits"]["variants"] is False
    assert other["distillation"]["transfer"]["augment"]["key"] != aug["key"]

    part = tmp_path / "part"
    preempted(monkeypatch, 4, train_cls.main, cls_argv(tiny_model, sentiment_files, part, *kd, "--seed", "1"))
    train_cls.main(cls_argv(tiny_model, sentiment_files, part, *kd, "--seed", "1", "--resume_from_checkpoint",
                            "latest"))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(part / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    assert (part / transfer.SAMPLES).read_text() == samples


def test_seeds_and_folds_share_one_labelled_transfer_set_without_their_held_out_rows(
        tiny_model, sentiment_files, tmp_path, monkeypatch):
    teacher = save_teacher(tmp_path / "teacher", tiny_model, seed=12)
    seen = []
    build = transfer.build

    def recording_build(task, ctx, data):
        built = build(task, ctx, data)
        seen.append((set(np.asarray(data.test["row_id"]).tolist()), np.asarray(built.train["row_id"]),
                     np.asarray(built.train["gold"]), len(built.pool)))
        return built

    monkeypatch.setattr(transfer, "build", recording_build)
    out = tmp_path / "folds"
    train_cls.main(["--model", tiny_model, "--train_file", sentiment_files["train"], "--output_dir", str(out),
                    *SHORT, "--teacher_model", teacher, "--distill_augment", "2", "--augment_model", tiny_model,
                    "--seeds", "1", "2", "--kfold", "2", "--max_steps", "2", "--eval_strategy", "no"])
    runs = [json.loads((out / f"seed_{s}_fold_{f}" / "results.json").read_text())["distillation"]
            for s in (1, 2) for f in (1, 2)]
    assert [r["cache"]["hit"] for r in runs] == [False, True, True, True]  # labelled once, for every seed and fold
    assert [r["transfer"]["cache_hits"]["variants"] for r in runs] == [False, True, True, True]
    assert len(seen) == 4 and {s[3] for s in seen} == {runs[0]["transfer"]["pool_rows"]}
    for held_out, rows, gold, _ in seen:
        assert len(held_out) == 120 and not held_out & set(rows.tolist())  # no variant of a held-out row
        assert set(rows[gold == 0].tolist()) <= set(rows[gold == 1].tolist())  # variants of its own rows only


@pytest.fixture(scope="module")
def ner_pool(tmp_path_factory):
    """300 training sentences: two augmentation chunks of 256, one per process."""
    d = tmp_path_factory.mktemp("ner-transfer")
    rng = random.Random(4)
    train = write_conll(d / "train.txt", [toy_ner_sentence(rng) for _ in range(300)])
    dev = write_conll(d / "dev.txt", [toy_ner_sentence(rng) for _ in range(31)])
    unlabeled = d / "unlabeled.txt"
    unlabeled.write_text("\n".join(" ".join(toy_ner_sentence(rng)[0]) for _ in range(40)) + "\n")
    return {"train": train, "dev": dev, "unlabeled": str(unlabeled)}


def test_ner_two_processes_build_the_same_variants_and_train_as_one_with_intermediate_losses(
        quiet_student, tiny_model, ner_pool, tmp_path):
    """Hidden-state distillation (per-step teacher) on a transfer set: 1 process x batch 8, then 2 processes x
    batch 4 that rebuild the variants (--overwrite_cache), each rank its chunk: the same file, the same weights."""
    from test_distributed import free_port

    teacher = save_teacher(tmp_path / "teacher", tiny_model, kind="ner", labels=NER_LABELS, hidden=32, layers=2)
    args = ["--teacher_model", teacher, "--distill_hidden", "--distill_augment", "2", "--augment_model", tiny_model,
            "--distill_unlabeled_file", ner_pool["unlabeled"], "--max_steps", "4", "--learning_rate", "1e-3",
            "--no_group_by_length", "--eval_strategy", "no", "--logging_steps", "1"]
    one = train_ner.main(ner_argv(quiet_student, ner_pool, tmp_path / "one", *args,
                                  "--per_device_train_batch_size", "8"))
    info = one["distillation"]["transfer"]
    assert one["distillation"]["teacher_logits"] == "per step" and one["distillation"]["intermediate"] == ["hidden"]
    assert info["originals"] == 300 and info["unlabeled_rows"] == 40 and info["variants"] > 500
    assert info["augment"]["sentences"] == 300 and one["train"]["train_samples"] == info["rows_per_epoch"]
    assert "original tokens: " in (tmp_path / "one" / transfer.SAMPLES).read_text()
    built_alone = variants_table(info)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    proc = run_script("train_ner.py", ner_argv(quiet_student, ner_pool, tmp_path / "two", *args, "--overwrite_cache",
                                               "--per_device_train_batch_size", "4"),
                      launcher=launcher, env={"ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["setup"]["num_processes"] == 2 and two["distillation"]["transfer"]["cache_hits"]["variants"] is False
    assert two["distillation"]["transfer"]["augment"]["sentences"] == 300  # both ranks' counts
    assert variants_table(two["distillation"]["transfer"]).equals(built_alone)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(os.path.join(quiet_student, "model.safetensors"))
    assert max((a[k] - start[k]).abs().max().item() for k in a if k in start) > 1e-3  # it did learn
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
