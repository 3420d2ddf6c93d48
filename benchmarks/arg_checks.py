"""Argument checks the benchmark scripts share: a bad size is refused by argparse, naming
the flag, before minutes of building, not met later as a traceback deep in the engine."""

from __future__ import annotations


def at_least(ap, args, **least: int) -> None:
    """`ap.error` unless each option (its dest name: prompt_len=2) is at least its bound."""
    for dest, bound in least.items():
        value = getattr(args, dest)
        if value < bound:
            ap.error(f"--{dest.replace('_', '-')} {value}: give {bound} or more")


def cuda_needed(ap, flag: str) -> None:
    """`ap.error` naming `flag` (e.g. "--backend cuda") when this host has no CUDA device."""
    import torch
    if not torch.cuda.is_available():
        ap.error(f"{flag} needs a CUDA GPU and this host has none; leave it out to run on "
                 "the CPU")
