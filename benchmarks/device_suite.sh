#!/usr/bin/env bash
# The device suite (see benchmarks/device_suite.py): on the GPU machine, from the checkout,
#   bash benchmarks/device_suite.sh "$OUT"            # part 1, at most 9 minutes
#   bash benchmarks/device_suite.sh "$OUT" --part 2   # what part 1 had no time for
set -u
cd "$(dirname "$0")/.." || exit 2
exec python3 benchmarks/device_suite.py "$@"
