#!/usr/bin/env bash
# The device suite (see benchmarks/device_suite.py): on the GPU machine, from the checkout,
#   bash benchmarks/device_suite.sh "$OUT"            # part 1, at most 9 minutes
#   bash benchmarks/device_suite.sh "$OUT" --part 2   # what part 1 had no time for
#   bash benchmarks/device_suite.sh "$OUT" --part 3   # Phi-4-mini, Gemma 3, DeepSeek-V3 decode
#   bash benchmarks/device_suite.sh "$OUT" --part 4   # Gemma 4 E2B-like decode
#   bash benchmarks/device_suite.sh "$OUT" --part 5   # --small-m-gemm extern vs triton
#   bash benchmarks/device_suite.sh "$OUT" --part 6   # KV tiers: 32k-prefix TTFT, load overlap
#   bash benchmarks/device_suite.sh "$OUT" --part 7   # what sampling adds to a decode step
set -u
cd "$(dirname "$0")/.." || exit 2
exec python3 benchmarks/device_suite.py "$@"
