"""Progress of a long per-tensor read (dequantizing a GGUF or an FP8 checkpoint), on the
compile log: a line every `every` seconds and one at the end, so a user compiling a large
checkpoint sees it move without a line per tensor."""

from __future__ import annotations

import time


class Progress:
    """`step(nbytes)` after each of `total` tensors; logs "  {verb} i/total {what} (... MiB
    read) in ...s"."""

    def __init__(self, log, total: int, what: str, verb: str = "dequantized", every: float = 2.0):
        self.log = log or (lambda msg: None)
        self.total, self.what, self.verb, self.every = total, what, verb, every
        self.done, self.bytes, self.t0, self.last = 0, 0, None, 0.0

    def start(self) -> None:
        """Start the clock (at the first read, not when the checkpoint is opened)."""
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def step(self, nbytes: int) -> None:
        self.start()
        self.done += 1
        self.bytes += int(nbytes)
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            self.log(f"  {self.verb} {self.done}/{self.total} {self.what} "
                     f"({self.bytes / 2**20:.1f} MiB read) in {now - self.t0:.1f}s")


__all__ = ["Progress"]
