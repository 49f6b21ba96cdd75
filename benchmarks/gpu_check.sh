#!/usr/bin/env bash
# The whole GPU check on the lent machine, from the repository root, with the bundle in .whl/ (benchmarks/gpu_bundle.py):
# install it offline, then run benchmarks/gpu.py. Results and logs go to $OUT (the device run's folder) or, without
# it, to benchmarks/results/. Arguments after the options go to gpu.py.
#
#   bash benchmarks/gpu_check.sh                    # device run, carrying ".whl"
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh --install-only   # the install half alone
set -uo pipefail

PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
INSTALL_ONLY=0
if [ "${1:-}" = "--install-only" ]; then
    INSTALL_ONLY=1
    shift
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1 PIP_NO_INPUT=1
mkdir -p "$RESULTS"

if [ ! -d .whl ]; then
    echo "no .whl/ here: build it with 'python benchmarks/gpu_bundle.py' and carry it" >&2
    exit 2
fi
versions() {
    "$PYTHON" -m pip list --disable-pip-version-check 2>/dev/null |
        grep -i -E '^(torch|triton|transformers|trl|trl-laser|accelerate|datasets|deepspeed|liger.kernel|peft|pyarrow|fsspec|pandas|regex|tokenizers|huggingface.hub|numpy|pydantic) '
}
echo "== before"
versions
# Resolve against what the image has plus the bundle; never the network. If the image's versions defeat the
# resolver, lay the bundle down as is and let `pip check` say what is off.
if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links .whl "trl-laser[deepspeed,liger]"; then
    echo "== offline resolution failed: installing the bundle without resolving dependencies"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps .whl/*.whl || exit 3
fi
echo "== after"
versions
"$PYTHON" -m pip check --disable-pip-version-check || echo "(pip check found the conflicts above; going on)"
if [ "$INSTALL_ONLY" = 1 ]; then
    exit 0
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" benchmarks/gpu.py --budget 420 --output "$RESULTS/gpu.json" "$@" 2>&1 | tee "$RESULTS/gpu_console.log"
