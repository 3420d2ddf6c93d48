"""braze IR: types, the op registry, graphs, text form, verifier, reference interpreter.

Imports nothing else of braze: every other subpackage builds on this one.
"""

from .errors import BrazeError
from .graph import Graph, Node, Value
from .interpreter import run_graph
from .ops import OpDef, all_ops, get_op
from .parser import parse_graph
from .printer import print_graph
from .types import MB, NB, SYMBOLS, R, S, T, TensorType
from .verifier import verify

__all__ = ["BrazeError", "Graph", "Node", "Value", "run_graph", "OpDef", "all_ops", "get_op",
           "parse_graph", "print_graph", "MB", "NB", "SYMBOLS", "R", "S", "T", "TensorType", "verify"]
