"""Run launch plans (braze/launch.py) with torch tensors: Triton kernels and extern torch ops.

Kernel modules are loaded from the artifact's kernels/ directory (braze/kernel_modules.py),
under `TRITON_INTERPRET=1` for the interpret backend, so the same plan runs on a
CPU through Triton's interpreter or on a GPU through compiled kernels.

A launch runs two ways: `PlanRunner.run` resolves its arguments from an env on
every call (eager), and `PlanRunner.bind` resolves them once for one batch size
into a `BoundLaunch`, a call with every argument frozen (tensors, ints, grid,
the compiled kernel) -- exactly what a CUDA graph capture freezes. A bound
extern writes into the static buffer it is given (`out=` GEMMs, copies); a view
is taken once at bind time over static storage and costs nothing at replay.
"""

from __future__ import annotations

import torch

from braze.ir import get_op
from braze.ir.errors import BrazeError
from braze.ir.layout import VIEW_OPS
from braze.ir.types import torch_dtype
from braze.kernel_modules import KernelModules
from braze.launch import compile_expr, compile_guard, spec_key


class PlanRunner:
    """Executes one node's launches; expressions are compiled once, evaluated per batch size."""

    def __init__(self, modules: KernelModules, workspaces: dict[str, dict], device, cubins=None):
        self.modules = modules
        self.cubins = cubins          # runtime.cubins.CubinCache on a GPU, else None
        self.ws_specs = workspaces
        self.device = device
        self._ws: dict[tuple, torch.Tensor] = {}
        self._ws_flat: dict[str, torch.Tensor] = {}      # bound plans' workspaces, by name
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
            self._ws[key] = _allocate(spec, shape, self.device)
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

    def reserve_workspaces(self, sizes_list: list[dict]) -> None:
        """Allocate each workspace once, for the largest of `sizes_list`; a smaller batch
        then gets a view of its first bytes (bound plans of every bucket share them)."""
        for name, spec in self.ws_specs.items():
            holds = compile_guard(spec.get("when"))    # sized only where its launches run
            used = [sz for sz in sizes_list if holds(sz)]
            if not used:
                continue
            need = max(_numel(tuple(self._expr(d, sz) for d in spec["shape"])) for sz in used)
            have = self._ws_flat.get(name)
            if have is None or have.numel() < need:
                self._ws_flat[name] = _allocate(spec, (need,), self.device)

    def shared_workspace(self, name: str, sizes: dict) -> torch.Tensor:
        """A view of the reserved workspace `name` shaped for `sizes`."""
        spec = self.ws_specs[name]
        shape = tuple(self._expr(d, sizes) for d in spec["shape"])
        flat = self._ws_flat.get(name)
        if flat is None or flat.numel() < _numel(shape):
            self.reserve_workspaces([sizes])
            flat = self._ws_flat[name]
        return flat[:_numel(shape)].view(shape)

    def bind(self, launch: dict, env: dict, sizes: dict, out_for=None) -> BoundLaunch | None:
        """Resolve `launch` once for `sizes`: a BoundLaunch to call at every replay, or None
        when nothing runs at replay (an empty grid; a view, whose result is put in `env`).

        `out_for(ref)` gives the static buffer an extern result must be written into, or
        None for a result that has no storage of its own (a view)."""
        out_for = out_for or (lambda ref: None)
        if "extern" in launch:
            return bind_extern(self, launch, env, sizes, out_for)
        args, tensors = [], []
        for a in launch["args"]:
            v = self.shared_workspace(a["ws"], sizes) if "ws" in a else self.arg(a, env, sizes)
            if isinstance(v, torch.Tensor):
                tensors.append((a.get("buf") or a.get("ws"), v))
            args.append(v)
        grid = tuple(self._expr(g, sizes) for g in launch["grid"])
        while len(grid) < 3:
            grid += (1,)
        if 0 in grid:
            return None
        check_pointer_dtypes(launch, args)
        name = launch.get("kernel") or f"{launch['module']}.{launch['fn']}"
        spec = spec_key(args)
        compiled = self._cubin(launch, spec)
        if compiled is not None:
            call = _cubin_call(compiled, grid, self._with_constexprs(launch, args))
        else:
            fn = self.modules.get(launch["module"], launch["fn"])
            kwargs = dict(launch.get("constexprs", {}), num_warps=launch.get("num_warps", 4),
                          num_stages=launch.get("num_stages", 2))
            call = _jit_call(fn[grid], args, kwargs)
        return BoundLaunch(name, launch["node"], call, tensors, spec,
                           decode_idle=bool(launch.get("decode_idle")))

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
        compiled = self._cubin(launch, spec_key(args)) if self.cubins is not None else None
        if compiled is not None:
            check_pointer_dtypes(launch, args)
            compiled[grid](*self._with_constexprs(launch, args))
            return
        fn = self.modules.get(launch["module"], launch["fn"])
        fn[grid](*args, **launch.get("constexprs", {}), num_warps=launch.get("num_warps", 4),
                 num_stages=launch.get("num_stages", 2))

    def _cubin(self, launch: dict, spec: str):
        """The stored cubin for a launch whose argument values have spec key `spec`, or
        None: JIT-compile from source."""
        if self.cubins is None or "kernel" not in launch:
            return None
        return self.cubins.get(launch["kernel"], launch, spec)

    def _with_constexprs(self, launch: dict, args: list) -> list:
        """All arguments in the kernel's order, constexprs included, as Triton's launcher
        for a compiled kernel takes them."""
        fn = self.modules.get(launch["module"], launch["fn"])
        it = iter(args)
        return [launch["constexprs"][n] if n in launch["constexprs"] else next(it)
                for n in fn.arg_names]


_POINTER_DTYPES = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16,
                   "*fp64": torch.float64, "*i64": torch.int64, "*i32": torch.int32,
                   "*i16": torch.int16, "*i8": torch.int8, "*u8": torch.uint8, "*i1": torch.bool}


def check_pointer_dtypes(launch: dict, args: list) -> None:
    """Each tensor argument has the element type the launch declares. A stored cubin reads
    its pointers as the types it was compiled for whatever tensor it is given (Triton's JIT
    would specialise anew): a mismatch there gives wrong numbers on a GPU only."""
    for a, v in zip(launch["args"], args):
        if isinstance(v, torch.Tensor):
            want = _POINTER_DTYPES.get(a.get("ty"))
            if want is not None and v.dtype != want:
                what = a.get("buf") or a.get("ws")
                raise BrazeError(f"kernel {launch.get('kernel') or launch['fn']} (node "
                                 f"{launch['node']}) takes {what} as {a['ty'][1:]}, and is given "
                                 f"a {str(v.dtype).removeprefix('torch.')} tensor")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _allocate(spec: dict, shape, device) -> torch.Tensor:
    """A workspace's memory: zeroed for a `zero` one (braze/launch.py), which its own
    launches keep zeroed; otherwise left as it comes."""
    alloc = torch.zeros if spec.get("zero") else torch.empty
    return alloc(shape, dtype=torch_dtype(spec["dtype"]), device=device)


class BoundLaunch:
    """One launch with every argument resolved: calling it replays the launch.

    `tensors` lists (name, tensor) of every tensor it reads or writes, for the checks
    that bound buffers never move; `node` is the graph node it belongs to; `spec` is a
    kernel launch's spec key (braze/launch.py: how Triton specialises its argument values),
    None for an extern call; `decode_idle` copies the launch's flag (braze/launch.py)."""

    __slots__ = ("call", "name", "node", "tensors", "spec", "decode_idle")

    def __init__(self, name: str, node: int, call, tensors: list, spec: str | None = None,
                 decode_idle: bool = False):
        self.name, self.node, self.call, self.tensors, self.spec = name, node, call, tensors, spec
        self.decode_idle = decode_idle

    def __call__(self) -> None:
        self.call()

    def __repr__(self) -> str:
        return f"BoundLaunch({self.name}, node {self.node})"


def _jit_call(launcher, args: list, kwargs: dict):
    return lambda: launcher(*args, **kwargs)


def _cubin_call(compiled, grid: tuple, args: list):
    launcher = compiled[grid]
    return lambda: launcher(*args)




def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def bind_extern(runner: PlanRunner, launch: dict, env: dict, sizes: dict, out_for):
    """Bind an extern launch (a torch op) so that replay writes only into static buffers.

    views       taken once now; nothing at replay (a view whose torch result is a copy
                gets a static buffer and is re-copied at every replay)
    linear      torch.mm / addmm with out= into the result's buffer
    matmul      torch.matmul with out=
    anything    the op's torch implementation, its results copied into their buffers
                (allocates temporaries at replay: inside a CUDA graph they come from the
                graph's pool; counted as `fallback` for `braze inspect`-style reports)"""
    op = launch["extern"]
    opdef = get_op(op)
    attrs = launch.get("attrs", {})
    args = [runner.arg(a, env, sizes) for a in launch["args"]]
    results = launch.get("results", [])
    tensors = [(a["buf"], v) for a, v in zip(launch["args"], args)
               if "buf" in a and isinstance(v, torch.Tensor)]
    name = f"extern.{op}"
    node = launch["node"]

    def as_tuple(out):
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    if op in VIEW_OPS:
        outs = as_tuple(opdef.impl(*args, **attrs))
        src = args[0]
        calls = []
        for k, (ref, t) in enumerate(zip(results, outs)):
            buf = out_for(ref)
            if buf is None and _same_storage(t, src):
                env[ref] = t                                  # a view: bound once
                continue
            if buf is None:
                raise BrazeError(f"extern {op} (node {node}) returned a copy for {ref} and the "
                                 f"plan has no buffer for it; recompile the artifact")
            buf = buf.view(t.shape)
            env[ref] = buf
            tensors.append((ref, buf))
            if op == "reshape" and len(results) == 1:
                calls.append(_copy_call(buf.view(src.shape), src))     # no temporary
            else:
                calls.append(_generic_one(opdef, args, attrs, buf, k))
        if not calls:
            return None
        return BoundLaunch(name, node, calls[0] if len(calls) == 1 else _seq(calls), tensors)

    bufs = [out_for(ref) for ref in results]
    for ref, buf in zip(results, bufs):
        if buf is None:
            raise BrazeError(f"extern {op} (node {node}) result {ref} has no static buffer")
        env[ref] = buf
        tensors.append((ref, buf))
    call = None
    if op == "linear" and len(bufs) == 1:
        call = _linear_out(args, bufs[0])
    elif op == "matmul" and len(bufs) == 1 and args[0].dim() >= 2 and args[1].dim() >= 2:
        a, b = args
        out = bufs[0]
        call = lambda: torch.matmul(a, b, out=out)
    elif op == "all_reduce" and len(bufs) == 1 and attrs["group_size"] > 1:
        call = _all_reduce_out(args[0], bufs[0], attrs["group_size"])
    if call is None:
        call = _generic_all(opdef, args, attrs, bufs)
        name += "(fallback)"
    return BoundLaunch(name, node, call, tensors)


def _linear_out(args, out: torch.Tensor):
    """x @ w.T (+ b) straight into `out`, or None when x cannot be seen as a matrix."""
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    if x.dim() == 1 or w.dim() != 2:
        return None
    try:
        x2 = x.view(-1, x.shape[-1])
        o2 = out.view(-1, out.shape[-1])
    except RuntimeError:
        return None
    wt = w.t()
    if b is None:
        return lambda: torch.mm(x2, wt, out=o2)
    return lambda: torch.addmm(b, x2, wt, out=o2)


def _all_reduce_out(x: torch.Tensor, out: torch.Tensor, group_size: int):
    """Copy x into its static buffer and sum it there across the ranks: no temporary, so
    on a GPU the NCCL call stays inside the captured segment (ir/op_collective.py)."""
    import torch.distributed as dist

    from braze.ir.op_collective import group_world
    group_world(group_size, "all_reduce")
    dst = out.view(x.shape)

    def run():
        if dst.data_ptr() != x.data_ptr():
            dst.copy_(x)
        dist.all_reduce(dst)
    return run


def _copy_call(dst: torch.Tensor, src: torch.Tensor):
    return lambda: dst.copy_(src)


def _seq(calls):
    def run():
        for c in calls:
            c()
    return run


def _generic_one(opdef, args, attrs, buf, index):
    def run():
        out = opdef.impl(*args, **attrs)
        out = (out,) if isinstance(out, torch.Tensor) else out
        buf.copy_(out[index])
    return run


def _generic_all(opdef, args, attrs, bufs):
    def run():
        out = opdef.impl(*args, **attrs)
        out = (out,) if isinstance(out, torch.Tensor) else (out or ())
        for buf, t in zip(bufs, out):
            buf.copy_(t)
    return run
