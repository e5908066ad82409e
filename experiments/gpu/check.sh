#!/usr/bin/env bash
# One command on an offline GPU node: install gpt2x from wheelhouse/ beside the node's own CUDA torch, then run every
# CUDA path once, briefly (budgeted for about 8 minutes on one H100; not yet timed on one), and write one table.
#
#   make wheelhouse                    # on a machine with PyPI access (experiments/gpu/wheelhouse.sh)
#   experiments/gpu/check.sh           # on the GPU node, in the repository, with the node's torch on $PYTHON
#
# Settings (environment): PYTHON (the interpreter whose torch to use; default python3), GPU_CHECK_DIR (work dir,
# default outputs/gpu-check), GPU_CHECK_TABLE (default gpu-check.md), LADDER_STEPS (steps per ladder rung, default 4).
# Each step has its own time limit; the table says pass, FAIL (exit code) or timeout per step, its seconds and the
# median ms/batch where the step trains. Logs: $GPU_CHECK_DIR/logs/<step>.log. Exits 1 if any step failed, 2 at once
# where there is no CUDA GPU or no matching wheelhouse.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WORK=${GPU_CHECK_DIR:-outputs/gpu-check}
TABLE=${GPU_CHECK_TABLE:-gpu-check.md}
LADDER_STEPS=${LADDER_STEPS:-4}
VENV=.venv-gpu

# -- preflight: stop at once, saying why, where this cannot work ------------------------------------------------------
if ! info=$("$PYTHON" -c 'import sys, torch; print(torch.__version__, torch.cuda.is_available(), "%d.%d" % sys.version_info[:2])' 2>&1); then
  echo "check.sh: $PYTHON cannot import torch ($(tail -n1 <<<"$info")). Load the node's CUDA build of PyTorch (module load ..., a" \
       "container) or point PYTHON at an interpreter that has it." >&2
  exit 2
fi
read -r torch_version cuda_ok python_version <<<"$(tail -n1 <<<"$info")"
if [ "$cuda_ok" != True ]; then
  echo "check.sh: no CUDA GPU: torch $torch_version on $PYTHON sees none (a CPU-only torch build, no GPU on this" \
       "machine, or CUDA_VISIBLE_DEVICES hides them). This check runs the CUDA paths; run it on a GPU node." >&2
  exit 2
fi
if ! ls wheelhouse/*.whl >/dev/null 2>&1; then
  echo "check.sh: no wheels in wheelhouse/; run 'make wheelhouse' (WHEEL_PYTHON=$python_version) where PyPI is" \
       "reachable and copy wheelhouse/ here." >&2
  exit 2
fi
if [ -f wheelhouse/TARGET ] && [ "$(cut -d' ' -f1 wheelhouse/TARGET)" != "$python_version" ]; then
  echo "check.sh: wheelhouse/ holds wheels for Python $(cut -d' ' -f1 wheelhouse/TARGET), this node's $PYTHON is" \
       "$python_version; rebuild it with WHEEL_PYTHON=$python_version make wheelhouse." >&2
  exit 2
fi

mkdir -p "$WORK/logs"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
export WORK LADDER_STEPS VENV PYTHON
failed=0
{
  echo "| step | status | seconds | ms/batch | note |"
  echo "|---|---|---|---|---|"
} >"$TABLE"

# run_step NAME LIMIT_S FUNCTION: run FUNCTION under `timeout`, log to $WORK/logs/NAME.log, add a row to the table.
# A step may write its median ms/batch to $WORK/NAME.ms and a note to $WORK/NAME.note.
run_step() {
  local name=$1 limit=$2 fn=$3 status rc t0 t1
  echo "== $name (limit ${limit} s)"
  rm -f "$WORK/$name.ms" "$WORK/$name.note"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" bash -c "$fn" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  case $rc in
    0) status=pass ;;
    124 | 137) status="timeout (${limit} s)"; failed=1 ;;
    *) status="FAIL (exit $rc)"; failed=1 ;;
  esac
  [ "$rc" = 0 ] || tail -n 20 "$WORK/logs/$name.log" | sed "s/^/   $name: /"
  printf '| %s | %s | %d | %s | %s |\n' "$name" "$status" "$((t1 - t0))" \
    "$(cat "$WORK/$name.ms" 2>/dev/null)" "$(cat "$WORK/$name.note" 2>/dev/null)" >>"$TABLE"
  echo "   $status"
}

# ms_per_batch RUN_DIR > FILE: the median ms/batch of a finished run, from its summary.json
ms_per_batch() {
  "$VENV/bin/python" -c 'import json, sys; print("%.1f" % json.load(open(sys.argv[1]))["ms_per_batch"])' "$1/summary.json"
}
export -f ms_per_batch

train() { "$VENV/bin/gpt2x-train" device=cuda "$@"; }
export -f train

# -- the steps ---------------------------------------------------------------------------------------------------------
install_from_wheelhouse() {
  rm -rf "$VENV"
  "$PYTHON" -m venv --system-site-packages "$VENV"  # the node's torch stays visible; everything else from wheels
  "$VENV/bin/pip" install --no-index --find-links wheelhouse -e . pytest
  "$VENV/bin/python" -c 'import torch, gpt2x.train; assert torch.cuda.is_available(); print(torch.__version__)'
}
cuda_tests() { "$VENV/bin/python" -m pytest -q -m cuda tests/test_cuda.py -rs; }

# a small bf16 + flash + compile run, checkpointed after 3 and 6 steps; then, without the second checkpoint, resume=auto
# from the first must repeat steps 3-5
checkpoint_resume() {
  local dir=$WORK/checkpoint
  rm -rf "$dir"
  local args=(model=small precision=bf16 attention=flash compile=default optim.max_steps=6 checkpoint_interval=3
              eval_interval=3 data.batch_size=8 data.seq_len=256 timing_warmup_steps=2 hydra.run.dir="$dir")
  train "${args[@]}"
  ms_per_batch "$dir" >"$WORK/checkpoint_resume.ms"
  cp "$dir/metrics.jsonl" "$WORK/straight.jsonl"
  rm "$dir/checkpoints/step_000005.pt" "$dir/summary.json"  # an unfinished run again (a finished one stays finished)
  train "${args[@]}" resume=auto
  "$VENV/bin/python" - "$WORK/straight.jsonl" "$dir/metrics.jsonl" >"$WORK/checkpoint_resume.note" <<'PY'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r and r["step"] >= 3}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert sorted(a) == sorted(b) == [3, 4, 5], (a, b)
diff = max(abs(a[s] - b[s]) for s in a)
print("resumed at step 3: losses of steps 3-5 " + ("bit-identical" if diff == 0 else f"differ by up to {diff:.1e}"))
assert diff < 1e-3, "resume is not exact"
PY
}
sample_flash_bf16() {
  local ckpt=$WORK/checkpoint/checkpoints/step_000005.pt
  "$VENV/bin/gpt2x-sample" --checkpoint "$ckpt" --device cuda --dtype bfloat16 --num-samples 2 --max-tokens 16
  "$VENV/bin/gpt2x-sample" --checkpoint "$ckpt" --device cuda --dtype float32 --num-samples 1 --max-tokens 8
  echo "trained with attention=flash; bf16, then float32 (sdpa)" >"$WORK/sample_flash_bf16.note"
}
# short_run NAME NOTE OVERRIDES...: one short training run into $WORK/NAME; its ms/batch and NOTE go to the table
short_run() {
  local name=$1 note=$2
  shift 2
  rm -rf "${WORK:?}/$name"
  train "$@" data.batch_size=8 data.seq_len=256 timing_warmup_steps=2 hydra.run.dir="$WORK/$name"
  ms_per_batch "$WORK/$name" >"$WORK/$name.ms"
  echo "$note" >"$WORK/$name.note"
}
export -f short_run
eval_hellaswag() {
  local file=$WORK/hellaswag_tiny.jsonl
  for i in 0 1 2 3 4 5 6 7; do
    echo "{\"ctx\": \"A man is sitting on a roof. He\", \"endings\": [\"is using wrap to wrap a pair of skis.\", \"is ripping level tiles off.\", \"is holding a rubik's cube.\", \"starts pulling up roofing on a roof.\"], \"label\": $((i % 4))}"
  done >"$file"
  short_run eval_hellaswag "val loss and HellaSwag (8 local examples) at steps 2 and 4" model=small precision=bf16 \
    attention=flash compile=default optim.max_steps=5 eval_interval=2 eval_steps=2 hellaswag_interval=2 \
    hellaswag_path="$file"
}
ddp_compile() {
  short_run ddp_compile "parallel=ddp on 1 GPU (nccl), compile=default, 2 micro-steps" parallel=ddp \
    parallel.nproc_per_node=1 model=small precision=bf16 attention=flash compile=default optim.max_steps=6 \
    data.total_batch_size=4096
}
fp16_scaler_fused() {
  short_run fp16_scaler_fused "GradScaler, fused AdamW, fused_ce" model=small precision=fp16 attention=sdpa \
    optim.fused=true loss=fused optim.max_steps=8
}
ladder_gpu() {
  local dir=$WORK/ladder_gpu
  rm -rf "$dir"
  # every rung, few steps, 2 micro-steps of 16 x 1024 (the ladder's 131072 tokens would take 8)
  "$VENV/bin/gpt2x-train" -m +experiment=ladder_gpu optim.max_steps="$LADDER_STEPS" optim.warmup_steps=1 \
    timing_warmup_steps=2 data.total_batch_size=32768 eval_steps=1 sample_max_tokens=8 hydra.sweep.dir="$dir"
  echo "$LADDER_STEPS steps per rung, 32768 tokens per step; per rung below" >"$WORK/ladder_gpu.note"
}
export -f install_from_wheelhouse cuda_tests checkpoint_resume sample_flash_bf16 eval_hellaswag ddp_compile \
  fp16_scaler_fused ladder_gpu

run_step install 300 install_from_wheelhouse
if [ "$failed" = 0 ]; then
  run_step cuda_tests 180 cuda_tests
  run_step checkpoint_resume 240 checkpoint_resume
  run_step sample_flash_bf16 120 sample_flash_bf16
  run_step eval_hellaswag 180 eval_hellaswag
  run_step ddp_compile 180 ddp_compile
  run_step fp16_scaler_fused 120 fp16_scaler_fused
  run_step ladder_gpu 540 ladder_gpu
  # one row per rung, from the sweep's report
  "$VENV/bin/python" - "$WORK/ladder_gpu/sweep.csv" >>"$TABLE" <<'PY' || failed=1
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    ms = f"{float(row['ms_per_batch']):.1f}" if row["ms_per_batch"] else ""
    mfu = f"MFU {float(row['mfu']):.1%}" if row["mfu"] else row["error"]
    print(f"| ladder_gpu rung={row['run']} | {row['status']} | | {ms} | {mfu} |")
PY
fi

gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')
{
  echo
  echo "$gpu, torch $torch_version, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >>"$TABLE"
echo
cat "$TABLE"
[ "$failed" = 0 ] || { echo "check.sh: some steps failed; logs in $WORK/logs/" >&2; exit 1; }
