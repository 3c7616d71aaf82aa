#!/usr/bin/env python
"""The masked-LM part of a transfer set's build on MRPC (../shared/assets), per --augment_passes:

    python bench/augment_passes.py --mlm out/mlm-wiki --passes 0 4 7               # time: every training pair
    python bench/augment_passes.py --mlm out/mlm-wiki --passes 0 4 7 --rows 48 --overlap

For each P it augments the training pairs as `--distill_augment 20 --augment_passes P` does (chunks of 256
pairs, the run's bf16 autocast where the CPU has it) and prints one JSON line: seconds, variants, masked copies
and the word counts. With --overlap (first sentences only), it also gives the share of each word's top-K candidates
that P = 0 (one masked copy per word, TinyBERT's) proposes too. Tokenizing and the teacher's labelling are not
included (results.json -> distillation.transfer has them).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "assets", "data", "glue_mrpc", "train.tsv")
sys.path.insert(0, ROOT)


def main() -> None:
    import pandas as pd
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from common.data.augment import Augmenter
    from common.data.labels import text_words

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mlm", required=True, help="a masked LM folder (e.g. a train_mlm.py output)")
    p.add_argument("--passes", type=int, nargs="+", default=[0, 4], help="0 first for --overlap")
    p.add_argument("--rows", type=int, default=None, help="the first N training pairs (default: all)")
    p.add_argument("--overlap", action="store_true", help="candidate overlap with P = 0 (first sentences)")
    p.add_argument("--top_k", type=int, default=15)
    a = p.parse_args()
    model = AutoModelForMaskedLM.from_pretrained(a.mlm).eval()
    tok = AutoTokenizer.from_pretrained(a.mlm)
    df = pd.read_csv(DATA, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig")[: a.rows]
    rows = [[text_words(x), text_words(y)] for x, y in zip(df["#1 String"], df["#2 String"])]
    bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else None
    reference = None
    for passes in a.passes:
        aug = Augmenter(model, tok, a.top_k, autocast, passes=passes)
        if a.overlap:
            sentences = [s for r in rows for s in r[:1]]
            started = time.perf_counter()
            cands = aug.candidates(sentences)
            out = {"passes": passes, "seconds": round(time.perf_counter() - started, 1), **aug.stats}
            reference = reference or cands
            shares = [len(set(x) & set(y)) / len(x) for rx, ry in zip(cands, reference) for x, y in zip(rx, ry) if x]
            out["top_k_overlap_with_passes_0"] = round(sum(shares) / len(shares), 3)
        else:
            started, made = time.perf_counter(), 0
            for i in range(0, len(rows), 256):  # the build's chunks
                made += sum(len(v) for v in aug.augment(rows[i:i + 256], 20, 0.4, 0))
            out = {"passes": passes, "seconds": round(time.perf_counter() - started, 1), "variants": made, **aug.stats}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
