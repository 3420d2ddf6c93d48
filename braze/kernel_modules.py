"""Load Triton kernel modules from source text, never through Python's import machinery.

Shared by codegen (which compiles the kernels to cubins) and the runtime (which launches
them), so neither imports the other. A module's text is read once, compiled with its
file name, and registered in `linecache` under that name, which is where Triton's
`@triton.jit` reads a kernel's source (`inspect.getsourcelines`). So:

- nothing is ever written: no `__pycache__/*.pyc` inside an artifact (the next open would
  refuse the unlisted file), no shared temporary directory for generated kernels (another
  user could plant code there; concurrent writers could leave a half-written file);
- the text compiled is the text Triton sees, even if the file changes on disk afterwards;
- with `hashes` (what the runtime passes: runtime/trust.py decided which text may run),
  the bytes read are checked against their trusted sha256 before anything is executed,
  and a module name is a plain identifier, so no name reaches outside the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
import os
import re
import sys
import types
from pathlib import Path

from braze.ir.errors import BrazeError

# Triton 3.9 warns that its FP-fusion default will change; pin today's default, here once,
# so that kernels JIT-compiled at run time match the cubins codegen built
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@contextlib.contextmanager
def _interpret(on: bool):
    """`@triton.jit` decides at decoration time whether it makes an interpreted function."""
    old = os.environ.get("TRITON_INTERPRET")
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old


def _settle_lazy_imports() -> None:
    """Import what Triton imports lazily at a kernel's first argument check, before any
    interpreted kernel runs. The interpreter swaps triton.language's functions for its
    own while a kernel runs, and Triton 3.9's first `mangle_type` then imports
    triton.experimental.gluon, whose import asserts those functions are JIT functions:
    in a process that imported triton without TRITON_INTERPRET (a tensor-parallel rank,
    a server), whichever interpreted kernel ran first failed. Triton 3.6 has no gluon."""
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass


def load_source(module: str, text: str, filename: str, interpret: bool) -> types.ModuleType:
    """Execute kernel source `text` as a fresh module named after `module` and its content."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    name = f"braze_kernels_{'interp' if interpret else 'gpu'}_{module}_{digest}"
    # mtime None: linecache.checkcache never replaces these lines from the disk
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    mod = types.ModuleType(name)
    mod.__file__ = filename
    sys.modules[name] = mod      # triton's jit resolves a kernel's globals through its module
    try:
        code = compile(text, filename, "exec", dont_inherit=True)
        if interpret:
            _settle_lazy_imports()
        with _interpret(interpret):
            exec(code, mod.__dict__)
    except Exception as e:   # a syntax or import error in a kernel module: name it
        sys.modules.pop(name, None)
        raise BrazeError(f"kernel module {filename} cannot be loaded: {type(e).__name__}: {e}") \
            from None
    return mod


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class KernelModules:
    """Kernel source modules by name: files of `directory`, or generated `sources` (module
    name -> text) that are not on disk. Each is loaded once.

    `hashes` (module name -> sha256 hex) admits a file of `directory` only if its bytes have
    that hash; None trusts the directory (codegen's own templates, installed with braze)."""

    def __init__(self, directory: Path, interpret: bool, sources: dict[str, str] | None = None,
                 hashes: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.interpret = interpret
        self.sources = sources if sources is not None else {}
        self.hashes = hashes
        self._mods: dict[str, types.ModuleType] = {}

    def get(self, module: str, fn: str):
        if module not in self._mods:
            if module in self.sources:
                text = self.sources[module]
                filename = f"<braze generated kernel {module}>"
            else:
                text = self._read(module)
                filename = str(self.directory / f"{module}.py")
            self._mods[module] = load_source(module, text, filename, self.interpret)
        try:
            return getattr(self._mods[module], fn)
        except AttributeError:
            raise BrazeError(f"kernel module {module} has no kernel {fn}") from None

    def _read(self, module: str) -> str:
        if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module):
            raise BrazeError(f"kernel module name {str(module)[:80]!r} is not a plain identifier; "
                             f"braze loads kernels only from {self.directory}")
        path = self.directory / f"{module}.py"
        if self.hashes is not None and module not in self.hashes:
            raise BrazeError(f"kernel module {path} is not one the artifact lists and hashes")
        if not path.is_file():
            raise BrazeError(f"kernel module {path} is missing")
        data = path.read_bytes()
        if self.hashes is not None and hashlib.sha256(data).hexdigest() != self.hashes[module]:
            raise BrazeError(f"kernel module {path} is not the file that was verified or signed "
                             f"(it changed after the artifact was opened); nothing of it ran")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise BrazeError(f"kernel module {path} is not UTF-8 text") from None
