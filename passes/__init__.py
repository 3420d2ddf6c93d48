"""Graph passes: one small file per pass, found and run by the pass manager (manager.py).

Write patterns with pattern.py and rewrite with rewrite.py; see docs/writing-a-pass.md.
"""

from .manager import (PIPELINES, STAGES, PassContext, PassManager, PassRecord, all_passes,
                      dump_after_each, get_pass, pipeline, register_pass)
from .pattern import Match, Op, Opt, Var, match
from .rewrite import Rewriter, Rule, rewrite

__all__ = ["PIPELINES", "STAGES", "PassContext", "PassManager", "PassRecord", "all_passes",
           "dump_after_each", "get_pass", "pipeline", "register_pass", "Match", "Op", "Opt", "Var",
           "match", "Rewriter", "Rule", "rewrite"]
