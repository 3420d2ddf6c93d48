#!/usr/bin/env bash
# The GPU image's library versions, checked on a CPU before a GPU session spends minutes on them.
#
# The GPU machine runs triton 3.6 and transformers 5.17 (benchmarks/device_suite.py); CI and
# this machine resolve newer ones. This builds a venv with those two pinned (and numpy < 2.4,
# which Triton 3.6's interpreter needs) beside the CPU torch, then runs the tests that touch
# what differs between versions: every kernel's sm_80/sm_90 cubins and its interpreted
# numerics under Triton 3.6, and the model families against transformers 5.17.
#
#   bash benchmarks/image_check.sh              # the kernel and family tests (about 15 min)
#   bash benchmarks/image_check.sh --all        # the whole default test run
#   VENV=/tmp/img bash benchmarks/image_check.sh tests/test_gemma4.py   # chosen tests
#
# It found, on 2026-12-06: a bf16 softmax whose row max Triton 3.6 refused to compile, and a
# test reading a transformers config attribute that 5.17 lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/braze-image-venv}
TRITON=${TRITON:-3.6.0}
TRANSFORMERS=${TRANSFORMERS:-5.17.0}
if [ ! -x "$VENV/bin/python" ]; then
    echo "== building $VENV: torch 2.13.0 (CPU), triton $TRITON, transformers $TRANSFORMERS"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet torch==2.13.0
    "$VENV/bin/python" -m pip install --quiet -e '.[test]'
    "$VENV/bin/python" -m pip install --quiet "triton==$TRITON" "transformers==$TRANSFORMERS" \
        "numpy<2.4"
fi
"$VENV/bin/python" -c "import triton, transformers, numpy, torch; print('== triton', \
triton.__version__, '· transformers', transformers.__version__, '· numpy', numpy.__version__, \
'· torch', torch.__version__)"
if [ "${1:-}" = "--all" ]; then
    shift
    tests=()
elif [ $# -gt 0 ]; then
    tests=("$@")
    set --
else
    tests=(tests/test_kernel_*.py tests/test_codegen.py tests/test_grouped_topk.py
           tests/test_specialize.py tests/test_trust.py tests/test_models_vs_hf.py
           tests/test_interpret_vs_hf.py tests/test_gemma4.py tests/test_deepseek_v3.py
           tests/test_gguf.py tests/test_linear_glu.py tests/test_small_m_gemm.py)
fi
# Triton 3.6's interpreter warns on numpy's scalar conversion at every kernel call
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
    "${tests[@]}" "$@"
