#!/usr/bin/env python
"""What the GPU measurement carries, made here and undone there (prepare.sh and run.sh call this).

    python bench/gpu/assets.py pack-model SRC DST        # MiniLM-L6 -> DST/model.bf16.safetensors + config/tokenizer
    python bench/gpu/assets.py unpack-model SRC DST      # the bf16 weights back to an fp32 model folder
    python bench/gpu/assets.py pack-data ASSETS DST      # MRPC and CoNLL-2003 as they are, plus the official
                                                         # scripts' JSON-lines copies
    python bench/gpu/assets.py unpack-data TAR DST       # prepare.sh's data.tar.xz into DST (no xz binary needed)

The weights travel in bf16 because the device call carries at most 64 MiB (fp32 MiniLM alone is 87 MiB); they are
loaded as fp32 there, so every run starts from the same rounded weights, ours and the official scripts' alike.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys

# The files a sequence or token classifier needs from the sentence-transformers folder; its pooling and
# sentence-transformers configs are not read by AutoModelFor*.
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
BF16_NAME = "model.bf16.safetensors"
# The official GLUE script maps labels through config.label2id; transformers 5 refuses integer keys there, so the
# labels travel as words (GLUE's own names for MRPC).
MRPC_LABELS = {"0": "not_equivalent", "1": "equivalent"}
# Rows each file must have (../shared/assets/README.md); a different count means the wrong file.
EXPECTED = {"glue_mrpc/train.tsv": 3668, "glue_mrpc/dev.tsv": 408,
            "conll2003/train.txt": 14041, "conll2003/valid.txt": 3250}


def pack_model(src: str, dst: str) -> dict:
    """Float tensors of SRC's model.safetensors cast to bf16 into DST, with the config and tokenizer files."""
    import torch
    from safetensors.torch import load_file, save_file

    missing = [f for f in ("model.safetensors", *MODEL_FILES) if not os.path.isfile(os.path.join(src, f))]
    if missing:
        sys.exit(f"{src}: not a MiniLM-L6 folder ({', '.join(missing)} missing).")
    os.makedirs(dst, exist_ok=True)
    weights = load_file(os.path.join(src, "model.safetensors"))
    small = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(small, os.path.join(dst, BF16_NAME), metadata={"format": "pt"})
    for name in MODEL_FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return {"tensors": len(small), "parameters": sum(v.numel() for v in small.values()),
            "bytes": os.path.getsize(os.path.join(dst, BF16_NAME))}


def unpack_model(src: str, dst: str) -> dict:
    """SRC's bf16 weights as fp32 in DST/model.safetensors, beside the config and tokenizer files."""
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    weights = load_file(os.path.join(src, BF16_NAME))
    full = {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(full, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in MODEL_FILES:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return {"tensors": len(full), "parameters": sum(v.numel() for v in full.values())}


def mrpc_rows(path: str) -> list[dict]:
    """GLUE's MRPC TSV (UTF-8 BOM, no quoting: sentences hold '"') as sentence1/sentence2/label-word rows."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = []
        for line, row in enumerate(reader, start=2):
            if row.get("Quality") not in MRPC_LABELS or row.get("#2 String") is None:
                sys.exit(f"{path}, line {line}: expected Quality 0/1 and five tab-separated columns.")
            rows.append({"sentence1": row["#1 String"], "sentence2": row["#2 String"],
                         "label": MRPC_LABELS[row["Quality"]]})
    return rows


def conll_rows(path: str) -> list[dict]:
    """CoNLL-2003's 'TOKEN POS CHUNK NER' lines as tokens/ner_tags sentences (-DOCSTART- lines dropped)."""
    rows, tokens, tags = [], [], []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts or parts[0] == "-DOCSTART-":
                if tokens:
                    rows.append({"tokens": tokens, "ner_tags": tags})
                tokens, tags = [], []
                continue
            if len(parts) != 4:
                sys.exit(f"{path}, line {line_no}: expected 4 columns (TOKEN POS CHUNK NER), got {len(parts)}.")
            tokens.append(parts[0])
            tags.append(parts[3])
    if tokens:
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def pack_data(assets: str, dst: str) -> dict:
    """DST/mrpc/{train,dev}.{tsv,json} and DST/conll/{train,valid}.{txt,json}: the originals for our scripts, the
    JSON-lines copies for the official ones (they read csv or json only)."""
    counts = {}
    for rel, expected in EXPECTED.items():
        src = os.path.join(assets, rel)
        if not os.path.isfile(src):
            sys.exit(f"{src}: missing; set BENCH_ASSETS to the folder holding glue_mrpc/ and conll2003/.")
        task = "mrpc" if rel.startswith("glue_mrpc") else "conll"
        os.makedirs(os.path.join(dst, task), exist_ok=True)
        name = os.path.basename(rel)
        shutil.copyfile(src, os.path.join(dst, task, name))
        rows = mrpc_rows(src) if task == "mrpc" else conll_rows(src)
        if len(rows) != expected:
            sys.exit(f"{src}: {len(rows)} rows, expected {expected}; is it the file ../shared/assets/README.md names?")
        write_jsonl(rows, os.path.join(dst, task, os.path.splitext(name)[0] + ".json"))
        counts[f"{task}/{name}"] = len(rows)
    return counts


def unpack_data(archive: str, dst: str) -> dict:
    """The archive's files under DST (Python's own xz: the GPU image need not have the xz program)."""
    import tarfile

    with tarfile.open(archive, "r:xz") as tar:
        names = tar.getnames()
        tar.extractall(dst, filter="data")
    return {"files": len([n for n in names if "." in os.path.basename(n)])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["pack-model", "unpack-model", "pack-data", "unpack-data"])
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    do = {"pack-model": pack_model, "unpack-model": unpack_model, "pack-data": pack_data,
          "unpack-data": unpack_data}[args.action]
    print(json.dumps({args.action: do(args.src, args.dst)}))


if __name__ == "__main__":
    main()
