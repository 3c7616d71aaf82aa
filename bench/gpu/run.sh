#!/usr/bin/env bash
# Issue 24's GPU figures in one command, on the GPU machine, from the repository root, after bench/gpu/prepare.sh
# filled .gpu/ here (the device call carries it: `carry: [".gpu"]`):
#
#   bash bench/gpu/run.sh                  # everything under $OUT: log.txt, results.jsonl, summary.md
#   bash bench/gpu/run.sh --stages c3,c6   # only those stages (ids below)
#   OUT=/tmp/x bash bench/gpu/run.sh --dry # the plumbing on a CPU: tiny runs, the same files
#
# The stages, in order of importance, each with an estimate from the issue's H200 figures (eager code) and a cap:
#   a   bf16 matmul peak, 8192^3 (the denominator of the fractions)
#   b   python3 -m pytest -q -m gpu tests/test_gpu.py -x
#   c1-c4  MRPC 3 epochs, batch 32: official fp32, official bf16, ours defaults (cold caches), ours --cuda_graphs off
#   d1-d4  CoNLL-2003 1 epoch: official fp32, ours defaults (cold), --cuda_graphs off, off + --mixed_precision no
#   c6, c5 MRPC: ours defaults again with c3's caches (warm), ours off + --mixed_precision no
#   e1, e2 batch 256, --cuda_graphs on, bf16: MRPC, CoNLL-2003
#   s1-s4  3 seeds (42 142 242) in one command, --cuda_graphs on vs off: MRPC, then CoNLL-2003 (each pair starts
#          only if both fit)
# A stage starts only if its estimate fits in what is left of the budget (GPUBENCH_BUDGET seconds, default 540, from
# this script's start; everything ends before it), and is killed at min(cap, what is left); a skipped, failed or
# killed stage gets its line in results.jsonl and the next one runs. Every run is a fresh process with its own
# datasets cache and compile cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), so each is cold, except c6, which
# reuses c3's: the second run of a job. Official runs get ACCELERATE_MIXED_PRECISION (what `accelerate launch
# --mixed_precision` sets) and bench/gpu/shim on PYTHONPATH (an offline `evaluate`); their training loop is timed by
# bench/gpu/official_timer.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DRY=0
STAGES=${GPUBENCH_STAGES:-all}
while (($#)); do
  case $1 in
    --dry) DRY=1 ;;
    --stages) STAGES=${2:?--stages needs a list, e.g. c1,c3}; shift ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (--dry, --stages LIST)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z ${OUT:-} ]]; then
  ((DRY)) || { echo "run.sh: OUT is not set (the device tool sets it; for a try here: OUT=/tmp/x ... --dry)" >&2; exit 2; }
  OUT=$(mktemp -d /tmp/gpubench-out.XXXXXX)
fi
[[ -d .gpu/model && -f .gpu/data.tar.xz && -d .gpu/official && -d .gpu/wheels ]] ||
  { echo "run.sh: .gpu/ is incomplete: run bash bench/gpu/prepare.sh here, and carry .gpu in the device call" >&2; exit 2; }
BUDGET=${GPUBENCH_BUDGET:-$((DRY ? 1200 : 540))}
DEADLINE=$((SECONDS + BUDGET - 15)) # 15 s kept for the summary
PY=${PYTHON:-python3}
WORK=${GPUBENCH_WORK:-/tmp/gpubench}
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"/{runs,timers,hf,cc}
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE=$!
JSONL=$OUT/results.jsonl
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg
# a dry run on a CPU runs --cuda_graphs on as the simulated programs (common/training/capture.py), not a refusal
((DRY)) && export BERT_FINETUNE_CAPTURE=simulate
say() { echo "[run.sh $(date -u +%T) +$((SECONDS))s] $*"; }
say "dry=$DRY budget=${BUDGET}s stages=$STAGES out=$OUT work=$WORK python=$(command -v "$PY")"
cat .gpu/MANIFEST.txt

# --- setup: wheels, model, data ---------------------------------------------------------------------------------
SITE=$WORK/site
# datasets: 5.2.0 needs pyarrow>=24, 5.0.1 pyarrow>=21 (and httpx<1); the machine's pyarrow decides.
arrow=$("$PY" -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
want=${GPUBENCH_DATASETS:-$( ((arrow >= 24)) && echo 5.2.0 || echo 5.0.1)}
((arrow >= 21)) || say "WARNING: pyarrow ${arrow} here; the carried datasets versions need 21 or newer"
# Only wheels this Python can install (the dry run's 3.11 skips the cp312 multiprocess and uses its own).
wheels=$("$PY" - .gpu/wheels/*.whl ".gpu/wheels/datasets/datasets-$want-py3-none-any.whl" <<'EOF'
import os, sys
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
except ImportError:
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename
here = set(sys_tags())
for w in sys.argv[1:]:
    fits = os.path.isfile(w) and here & set(parse_wheel_filename(os.path.basename(w))[3])
    print(w if fits else f"skipped {w}", file=sys.stdout if fits else sys.stderr)
EOF
)
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels ||
  say "WARNING: the wheels did not install; runs that need datasets will fail"
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
MODEL=$WORK/minilm
"$PY" bench/gpu/assets.py unpack-model .gpu/model "$MODEL" || say "WARNING: the model did not unpack"
"$PY" bench/gpu/assets.py unpack-data .gpu/data.tar.xz "$WORK" || say "WARNING: the data did not unpack"
D=$WORK/data
if ((DRY)); then
  # The official scripts take no sample limit: their JSON-lines copies are cut instead (ours get flags below).
  for f in "$D"/mrpc/train.json "$D"/conll/train.json; do head -n 96 "$f" >"$f.cut" && mv "$f.cut" "$f"; done
  for f in "$D"/mrpc/dev.json "$D"/conll/valid.json; do head -n 64 "$f" >"$f.cut" && mv "$f.cut" "$f"; done
fi
command -v nvidia-smi >/dev/null && nvidia-smi
GRAPHS_FLAG=1
grep -rq cuda_graphs common train_cls.py train_ner.py || { GRAPHS_FLAG=0; say "no --cuda_graphs in this checkout: runs go without it"; }
# One line about the machine and the packages the runs import (printed, and the first line of results.jsonl).
"$PY" - "$JSONL" "$MODEL/config.json" "$DRY" "$GRAPHS_FLAG" "$BUDGET" <<'EOF'
import importlib, json, subprocess, sys
jsonl, config_path, dry, flag, budget = sys.argv[1:]
versions = {"python": sys.version.split()[0]}
for name in ("torch", "transformers", "accelerate", "datasets", "pyarrow", "fsspec", "huggingface_hub", "dill",
             "multiprocess", "seqeval", "sklearn", "tokenizers"):
    try:
        module = importlib.import_module(name)
        versions[name] = getattr(module, "__version__", "?")
        print(f"{name} {versions[name]}  {module.__file__}")
    except Exception as e:
        versions[name] = f"import failed: {e!r}"
        print(f"{name}: IMPORT FAILED: {e!r}")


def output(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


with open(config_path) as fh:
    config = json.load(fh)
shape = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
         "max_position_embeddings", "type_vocab_size")
record = {"id": "machine", "kind": "machine", "dry": dry == "1",
          "commit": output(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
          "gpu": output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
          "versions": versions, "cuda_graphs_flag": flag == "1", "budget_seconds": int(budget),
          "model": {k: config[k] for k in shape}}
with open(jsonl, "a") as fh:
    fh.write(json.dumps(record) + "\n")
EOF
say "setup done"

# --- the stages -------------------------------------------------------------------------------------------------
selected() { [[ $STAGES == all || ,$STAGES, == *,$1,* ]]; }
# fits ID ESTIMATE CAP: whether the stage runs; sets LIMIT = min(CAP, seconds left). Writes a skipped stage's line.
fits() {
  local left=$((DEADLINE - SECONDS))
  if ((left < $2)); then
    say "$1 skipped: ${left} s left of the budget, it needs about $2 s"
    printf '{"id": "%s", "skipped": true, "reason": "%s s left of the budget, about %s s needed"}\n' \
      "$1" "$left" "$2" >>"$JSONL"
    return 1
  fi
  LIMIT=$3
  ((LIMIT > left)) && LIMIT=$left
  return 0
}
DRY_FLAGS=()
((DRY)) && DRY_FLAGS=(--max_steps 3 --max_train_samples 96 --max_eval_samples 64)
MRPC=(train_cls.py --model "$MODEL" --train_file "$D/mrpc/train.tsv" --validation_file "$D/mrpc/dev.tsv"
  --text_column "#1 String" --text_pair_column "#2 String" --label_column Quality --num_train_epochs 3
  --learning_rate 5e-5 --max_length 128)
CONLL=(train_ner.py --model "$MODEL" --train_file "$D/conll/train.txt" --validation_file "$D/conll/valid.txt"
  --num_train_epochs 1 --learning_rate 5e-5 --max_length 128)

# ours ID TASK LABEL ESTIMATE CAP CACHE_OF FLAGS...: our script with the task's flags, batch 32 and seed 42 unless
# FLAGS say otherwise; CACHE_OF = the stage whose caches it uses (itself: fresh ones).
ours() {
  local id=$1 task=$2 label=$3 est=$4 cap=$5 cache=$6
  shift 6
  selected "$id" && fits "$id" "$est" "$cap" || return 0
  local flags=() seed=(--seed 42) batch=(--per_device_train_batch_size 32) graphs=absent
  while (($#)); do
    case $1 in
      --cuda_graphs) graphs=$2; ((GRAPHS_FLAG)) && flags+=("$1" "$2"); shift ;;
      --seeds) seed=("$1" 42 142 242) ;;
      --per_device_train_batch_size) batch=("$1" "$2"); shift ;;
      *) flags+=("$1") ;;
    esac
    shift
  done
  local preset
  if [[ $task == mrpc ]]; then preset=("${MRPC[@]}"); else preset=("${CONLL[@]}"); fi
  "$PY" bench/gpu/record.py --jsonl "$JSONL" --id "$id" --task "$task" --impl ours --label "$label" \
    --timeout "$LIMIT" --results "$WORK/runs/$id" --note "cuda_graphs_asked=$graphs" --note "caches=$cache" \
    --note "batch=${batch[1]}" --env "HF_DATASETS_CACHE=$WORK/hf/$cache" \
    --env "TORCHINDUCTOR_CACHE_DIR=$WORK/cc/$cache" --env "TRITON_CACHE_DIR=$WORK/cc/$cache/triton" -- \
    "$PY" "${preset[@]}" "${batch[@]}" "${seed[@]}" "${flags[@]}" "${DRY_FLAGS[@]}" \
    --output_dir "$WORK/runs/$id" --overwrite_output_dir
  rm -rf "$WORK/runs/$id" # its numbers are in results.jsonl; the weights only fill the disk
}

# official ID TASK LABEL ESTIMATE CAP PRECISION: the official script, batch 32, seed 42, its other defaults.
official() {
  local id=$1 task=$2 label=$3 est=$4 cap=$5 precision=$6
  selected "$id" && fits "$id" "$est" "$cap" || return 0
  local args
  if [[ $task == mrpc ]]; then
    args=(.gpu/official/run_glue_no_trainer.py --train_file "$D/mrpc/train.json" --validation_file "$D/mrpc/dev.json"
      --num_train_epochs 3)
  else
    args=(.gpu/official/run_ner_no_trainer.py --train_file "$D/conll/train.json" --validation_file "$D/conll/valid.json"
      --num_train_epochs 1)
  fi
  ((DRY)) && args+=(--max_train_steps 3)
  "$PY" bench/gpu/record.py --jsonl "$JSONL" --id "$id" --task "$task" --impl official --label "$label" \
    --timeout "$LIMIT" --timer "$WORK/timers/$id.json" --note "mixed_precision=$precision" --note batch=32 \
    --env "PYTHONPATH=$ROOT/bench/gpu/shim:$PYTHONPATH" --env "ACCELERATE_MIXED_PRECISION=$precision" \
    --env "HF_DATASETS_CACHE=$WORK/hf/$id" --env TQDM_MININTERVAL=30 -- \
    "$PY" bench/gpu/official_timer.py "$WORK/timers/$id.json" "${args[@]}" --model_name_or_path "$MODEL" \
    --max_length 128 --per_device_train_batch_size 32 --learning_rate 5e-5 --seed 42 --output_dir "$WORK/runs/$id"
  rm -rf "$WORK/runs/$id"
}

if selected a && fits a 15 60; then
  if ((DRY)); then
    timeout "$LIMIT" "$PY" bench/gpu/peak.py "$JSONL" --n 256 --warmup 1 --repeats 2
  else
    timeout "$LIMIT" "$PY" bench/gpu/peak.py "$JSONL"
  fi
  rc=$?
  if ((rc)); then
    say "a failed or was killed (rc $rc)"
    killed=false
    ((rc == 124)) && killed=true
    printf '{"id": "a", "kind": "peak", "rc": %d, "timed_out": %s}\n' "$rc" "$killed" >>"$JSONL"
  fi
fi
if selected b && fits b 60 120; then
  if [[ -f tests/test_gpu.py ]]; then
    "$PY" bench/gpu/record.py --jsonl "$JSONL" --id b --task - --impl check --label "pytest -m gpu tests/test_gpu.py" \
      --timeout "$LIMIT" --env "TORCHINDUCTOR_CACHE_DIR=$WORK/cc/b" --env "TRITON_CACHE_DIR=$WORK/cc/b/triton" -- \
      "$PY" -m pytest -q -m gpu tests/test_gpu.py -x
  else
    say "b: tests/test_gpu.py is not in this checkout"
    echo '{"id": "b", "skipped": true, "reason": "tests/test_gpu.py is not in this checkout"}' >>"$JSONL"
  fi
fi
official c1 mrpc "official, fp32" 25 90 no
official c2 mrpc "official, bf16" 28 90 bf16
ours c3 mrpc "ours, defaults (cold caches)" 30 120 c3
ours c4 mrpc "ours, --cuda_graphs off" 27 90 c4 --cuda_graphs off
official d1 conll "official, fp32" 27 90 no
ours d2 conll "ours, defaults (cold caches)" 31 120 d2
ours d3 conll "ours, --cuda_graphs off" 31 90 d3 --cuda_graphs off
ours d4 conll "ours, --cuda_graphs off --mixed_precision no" 33 90 d4 --cuda_graphs off --mixed_precision no
ours c6 mrpc "ours, defaults (warm: c3's caches)" 20 90 c3
ours c5 mrpc "ours, --cuda_graphs off --mixed_precision no" 22 90 c5 --cuda_graphs off --mixed_precision no
ours e1 mrpc "ours, batch 256, --cuda_graphs on, bf16" 25 90 e1 --per_device_train_batch_size 256 \
  --cuda_graphs on --mixed_precision bf16
ours e2 conll "ours, batch 256, --cuda_graphs on, bf16" 25 90 e2 --per_device_train_batch_size 256 \
  --cuda_graphs on --mixed_precision bf16
# A pair or nothing: the first of each needs the time of both (50 + 55, 60 + 65).
ours s1 mrpc "ours, 3 seeds, --cuda_graphs on" 105 150 s1 --seeds --cuda_graphs on
ours s2 mrpc "ours, 3 seeds, --cuda_graphs off" 55 150 s2 --seeds --cuda_graphs off
ours s3 conll "ours, 3 seeds, --cuda_graphs on" 125 150 s3 --seeds --cuda_graphs on
ours s4 conll "ours, 3 seeds, --cuda_graphs off" 65 150 s4 --seeds --cuda_graphs off

say "stages done; summary:"
"$PY" bench/gpu/summarize.py "$JSONL" >"$OUT/summary.md" || say "summarize.py failed (rc $?)"
cat "$OUT/summary.md"
say "end: $OUT holds $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE"
