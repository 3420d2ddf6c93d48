"""Run launch plans (braze/launch.py) with torch tensors: Triton kernels and extern torch ops.

Kernel modules are loaded from source files (the artifact's kernels/ directory),
under `TRITON_INTERPRET=1` for the interpret backend, so the same plan runs on a
CPU through Triton's interpreter or on a GPU through compiled kernels.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from braze.ir import get_op
from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype
from braze.launch import compile_expr


@contextlib.contextmanager
def _interpret(on: bool):
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


# Triton 3.9 warns that its FP-fusion default will change; pin today's default so kernels
# JIT-compiled here match the cubins codegen built (codegen/aot.py pins the same)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


class KernelModules:
    """Kernel source modules by name, loaded once from `directory`."""

    def __init__(self, directory: Path, interpret: bool, sources: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.interpret = interpret
        self.sources = sources if sources is not None else {}   # generated, not on disk yet
        self._mods: dict[str, object] = {}

    def get(self, module: str, fn: str):
        if module not in self._mods:
            path = self.directory / f"{module}.py"
            if module in self.sources:
                path = self._materialise(module)
            if not path.exists():
                raise BrazeError(f"kernel module {path} is missing")
            name = f"braze_kernels_{'interp' if self.interpret else 'gpu'}_{abs(hash(str(path)))}_{module}"
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod      # triton's jit resolves globals through the module
            with _interpret(self.interpret):
                spec.loader.exec_module(mod)
            self._mods[module] = mod
        try:
            return getattr(self._mods[module], fn)
        except AttributeError:
            raise BrazeError(f"kernel module {module} has no kernel {fn}") from None


    def _materialise(self, module: str) -> Path:
        """Triton's jit needs a real source file (it reads the function's source lines)."""
        import hashlib
        import tempfile
        text = self.sources[module]
        d = Path(tempfile.gettempdir()) / "braze-kernels"
        d.mkdir(exist_ok=True)
        path = d / f"{module}_{hashlib.sha256(text.encode()).hexdigest()[:16]}.py"
        if not path.exists():
            path.write_text(text)
        return path


class PlanRunner:
    """Executes one node's launches; expressions are compiled once, evaluated per batch size."""

    def __init__(self, modules: KernelModules, workspaces: dict[str, dict], device, cubins=None):
        self.modules = modules
        self.cubins = cubins          # runtime.cubins.CubinCache on a GPU, else None
        self.ws_specs = workspaces
        self.device = device
        self._ws: dict[tuple, torch.Tensor] = {}
        self._exprs: dict[str, object] = {}

    def _expr(self, text, sizes):
        key = str(text)
        if key not in self._exprs:
            self._exprs[key] = compile_expr(text)
        return self._exprs[key](sizes)

    def workspace(self, name: str, sizes: dict) -> torch.Tensor:
        spec = self.ws_specs[name]
        shape = tuple(self._expr(d, sizes) for d in spec["shape"])
        key = (name, shape)
        if key not in self._ws:
            self._ws[key] = torch.empty(shape, dtype=torch_dtype(spec["dtype"]), device=self.device)
        return self._ws[key]

    def arg(self, a: dict, env: dict, sizes: dict):
        if "buf" in a:
            return env[a["buf"]]
        if "ws" in a:
            return self.workspace(a["ws"], sizes)
        if "expr" in a:
            return self._expr(a["expr"], sizes)
        if "int" in a:
            return a["int"]
        if "float" in a:
            return a["float"]
        if "stride" in a:
            ref, dim = a["stride"]
            return env[ref].stride(dim)
        raise BrazeError(f"unknown launch argument {a}")

    def run(self, launch: dict, env: dict, sizes: dict) -> None:
        args = [self.arg(a, env, sizes) for a in launch["args"]]
        if "extern" in launch:
            opdef = get_op(launch["extern"])
            out = opdef.impl(*args, **launch.get("attrs", {}))
            if isinstance(out, torch.Tensor):
                out = (out,)
            for ref, t in zip(launch.get("results", []), out):
                env[ref] = t
            return
        grid = tuple(self._expr(g, sizes) for g in launch["grid"])
        if 0 in grid:
            return
        compiled = self.cubins.get(launch["kernel"], launch) if self.cubins and "kernel" in launch else None
        if compiled is not None and all(a.data_ptr() % 16 == 0 for a in args
                                        if isinstance(a, torch.Tensor)):
            # cubins were compiled for 16-byte aligned pointers; anything else JITs
            compiled[grid](*self._with_constexprs(launch, args))
            return
        fn = self.modules.get(launch["module"], launch["fn"])
        fn[grid](*args, **launch.get("constexprs", {}), num_warps=launch.get("num_warps", 4),
                 num_stages=launch.get("num_stages", 2))

    def _with_constexprs(self, launch: dict, args: list) -> list:
        """All arguments in the kernel's order, constexprs included, as Triton's launcher
        for a compiled kernel takes them."""
        fn = self.modules.get(launch["module"], launch["fn"])
        it = iter(args)
        return [launch["constexprs"][n] if n in launch["constexprs"] else next(it)
                for n in fn.arg_names]
