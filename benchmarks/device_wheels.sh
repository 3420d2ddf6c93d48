#!/usr/bin/env bash
# Wheels the GPU image lacks, for the device suite to install with --no-index (the device
# machine has no network). Run here, in the checkout, before a device call, and name .whl
# in the call's carry: the suite's install stage installs whatever .whl/ holds.
#   cryptography (+ cffi, pycparser): braze compile signs artifacts (braze/signing.py), and
#   only a signed artifact's cubins are launched (docs/trust.md)
#   xgrammar (+ apache-tvm-ffi, pydantic, pydantic-core, annotated-types, typing-inspection):
#   the grammar-constrained requests of tests/test_gpu.py (structured output with async
#   overlap on the device); without them that test skips
set -eu
cd "$(dirname "$0")/.."
# where git keeps this checkout's excludes: .git/info/exclude, or the main repository's
# in a worktree (there .git is a file, and writing under it would stop this script)
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
for pkg in "cryptography==48.0.0" "cffi==2.0.0" "pycparser==3.0" \
           "xgrammar==0.2.9" "apache-tvm-ffi==0.1.15.post2" "pydantic==2.14.4" \
           "pydantic_core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -la .whl
