#!/usr/bin/env bash
# One ladder rung of two checkouts, interleaved: is this checkout faster or slower than REV on the same machine now?
#   experiments/ladder/ab.sh REV RUNG [ROUNDS] [overrides...]
#   experiments/ladder/ab.sh c2f7902 fp32 2
#   experiments/ladder/ab.sh c2f7902 ddp 2 parallel=fsdp
# Prints the median ms/batch of each run (summary.json); REV runs from a temporary git worktree with this venv.
set -euo pipefail
rev=$1; rung=$2; rounds=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
here=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
out=$(mktemp -d); trap 'git -C "$here" worktree remove --force "$out/rev" >/dev/null 2>&1 || true' EXIT
git -C "$here" worktree add -q --detach "$out/rev" "$rev"
export HF_HUB_OFFLINE=1
for r in $(seq "$rounds"); do
  for side in rev this; do
    dir=$here; [ "$side" = rev ] && dir=$out/rev
    # `python -m` puts the working directory first on sys.path: each side runs its own gpt2x
    (cd "$dir" && "$py" -m gpt2x.train +experiment=ladder "rung=$rung" "$@" "hydra.run.dir=$out/$side-$r" \
      > "$out/$side-$r.log" 2>&1) || { echo "$side round $r failed: $out/$side-$r.log"; continue; }
    ms=$("$py" -c "import json,sys; print(round(json.load(open(sys.argv[1]))['ms_per_batch'], 1))" \
      "$out/$side-$r/summary.json")
    echo "rung=$rung $* | $side ($( [ "$side" = rev ] && echo "$rev" || git -C "$here" rev-parse --short HEAD )) round $r: $ms ms/batch"
  done
done
