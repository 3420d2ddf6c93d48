#!/usr/bin/env python
"""Peak memory of `braze compile` on a sharded checkpoint, against the checkpoint's size.

Writes a random Llama-shaped float32 checkpoint of about `--mb` MiB, saved by transformers
in `--shard-mb` shards, then runs `braze compile` on it in a child process and reads the
child's peak resident set (ru_maxrss). The baseline is a child that imports what compile
imports and does nothing else, so "extra" is the memory the compile itself needed.

Issue 12's bound: compiling must not need twice the checkpoint's size.

    python benchmarks/compile_memory.py                  # ~600 MiB, 100 MiB shards
    python benchmarks/compile_memory.py --mb 1500 --shard-mb 400
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

# Every measurement runs in a child started from this lean parent: Linux carries ru_maxrss
# across fork and exec, so a parent that had built the checkpoint would set the floor.
CHILD = """
import resource, sys
import braze, braze.compiler, transformers, torch
if sys.argv[1] == "make":
    from braze.tiny import make_checkpoint
    h, i, v, layers, shard = (int(a) for a in sys.argv[3:8])
    make_checkpoint("llama", sys.argv[2], hidden_size=h, intermediate_size=i,
                    num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                    head_dim=64, vocab_size=v, max_shard_size=f"{shard}MB")
if sys.argv[1] == "compile":
    braze.compile(sys.argv[2], sys.argv[3], opt_level=2, targets="", dtype="float32")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_mib(*args) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], check=True,
                         capture_output=True, text=True).stdout.split()[-1]
    return int(out) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=600, help="checkpoint size to aim for, MiB")
    ap.add_argument("--shard-mb", type=int, default=100, help="transformers' max_shard_size")
    args = ap.parse_args()
    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 4
    layers = max(1, round((args.mb * 2**20 - 2 * vocab * hidden * 4) / per_layer))
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "model"
        peak_mib("make", ckpt, hidden, inter, vocab, layers, args.shard_mb)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
        base = peak_mib("baseline")
        peak = peak_mib("compile", str(ckpt), str(Path(d) / "out.braze"))
    print(f"checkpoint {size:.0f} MiB in {args.shard_mb} MiB shards ({layers} layers)")
    print(f"peak RSS: compile {peak:.0f} MiB, imports alone {base:.0f} MiB, "
          f"extra {peak - base:.0f} MiB = {(peak - base) / size:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
