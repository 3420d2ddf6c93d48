"""Graph passes: one small file per pass, found and run by the pass manager (manager.py).

Write patterns with pattern.py; see docs/writing-a-pass.md.
"""

from .manager import (PIPELINES, PassContext, PassManager, PassRecord, all_passes,
                      dump_after_each, get_pass, register_pass)
from .pattern import Match, Op, Opt, Var, erase_matched, match

__all__ = ["PIPELINES", "PassContext", "PassManager", "PassRecord", "all_passes",
           "dump_after_each", "get_pass", "register_pass", "Match", "Op", "Opt", "Var",
           "erase_matched", "match"]
