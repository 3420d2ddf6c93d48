#!/usr/bin/env python
"""Peak memory of `braze compile` on a sharded checkpoint, against the checkpoint's size.

Writes a random Llama-shaped float32 checkpoint of about `--mb` MiB, saved by transformers
in `--shard-mb` shards, then runs `braze compile` on it in a child process and reads the
child's peak resident set (ru_maxrss). The baseline is a child that imports what compile
imports and does nothing else, so "extra" is the memory the compile itself needed.

Issue 12's bound: compiling must not need twice the checkpoint's size.

With `--fp8` the checkpoint is then rewritten as DeepSeek-V3 ships its weights (the linear
weights in float8_e4m3fn with 128x128 `weight_scale_inv` block scales, braze/tiny_fp8.py)
and compiled to bfloat16, so each weight is dequantized as it is read (frontend/fp8.py);
the ratio is then against the fp8 files, which are half the size of the bf16 artifact.

    python benchmarks/compile_memory.py                  # ~600 MiB, 100 MiB shards
    python benchmarks/compile_memory.py --mb 1500 --shard-mb 400
    python benchmarks/compile_memory.py --fp8            # the same model, fp8 on disk
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
if sys.argv[1] == "fp8":
    from braze.tiny_fp8 import fp8_checkpoint
    fp8_checkpoint(sys.argv[2], sys.argv[3], block=(128, 128), shards=int(sys.argv[4]))
if sys.argv[1] == "compile":
    braze.compile(sys.argv[2], sys.argv[3], opt_level=2, targets="", dtype=sys.argv[4])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_mib(*args) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], check=True,
                         capture_output=True, text=True).stdout.split()[-1]
    return int(out) / 1024


HIDDEN, INTER, VOCAB = 1024, 2816, 32000
PER_LAYER = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) * 4     # float32 bytes


def checkpoint_mib(layers: int) -> float:
    """The checkpoint's size with `layers` layers: untied embedding and LM head, then layers."""
    return (2 * VOCAB * HIDDEN * 4 + layers * PER_LAYER) / 2**20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=600,
                    help=f"checkpoint size to aim for, MiB (at least {checkpoint_mib(1):.0f}: "
                         "the embedding, LM head and one layer)")
    ap.add_argument("--shard-mb", type=int, default=100, help="transformers' max_shard_size")
    ap.add_argument("--fp8", action="store_true",
                    help="store the linear weights in fp8 with 128x128 block scales and "
                         "compile to bfloat16")
    args = ap.parse_args(argv)
    if args.mb < round(checkpoint_mib(1)):
        ap.error(f"--mb {args.mb}: the smallest checkpoint of this shape is "
                 f"{checkpoint_mib(1):.0f} MiB (embedding, LM head and one layer); give "
                 "--mb of at least that")
    if args.shard_mb < 1:
        ap.error(f"--shard-mb {args.shard_mb}: give a shard size of 1 MiB or more")
    hidden, inter, vocab = HIDDEN, INTER, VOCAB
    layers = max(1, round((args.mb * 2**20 - 2 * vocab * hidden * 4) / PER_LAYER))
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "model"
        peak_mib("make", ckpt, hidden, inter, vocab, layers, args.shard_mb)
        dtype, kind = "float32", "float32"
        if args.fp8:
            shards = len(list(ckpt.glob("*.safetensors")))
            fp8 = Path(d) / "model-fp8"
            peak_mib("fp8", ckpt, fp8, shards)
            ckpt, dtype, kind = fp8, "bfloat16", "fp8 (128x128 block scales) -> bfloat16"
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
        nfiles = len(list(ckpt.glob("*.safetensors")))
        base = peak_mib("baseline")
        peak = peak_mib("compile", str(ckpt), str(Path(d) / "out.braze"), dtype)
    print(f"checkpoint {size:.0f} MiB, {kind}, in {nfiles} shards ({layers} layers)")
    print(f"peak RSS: compile {peak:.0f} MiB, imports alone {base:.0f} MiB, "
          f"extra {peak - base:.0f} MiB = {(peak - base) / size:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
