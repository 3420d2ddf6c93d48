"""Trace a models/ definition with torch.fx and map every fx node to IR ops.

Nothing is executed: fx records the calls symbolically, and the IR infers
every shape from the op registry. A call the IR cannot express is reported
with the module path, the function and the source line that made it.
"""

from __future__ import annotations

import builtins
import operator
import time
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from braze.ir import Graph, Value
from braze.ir.contract import (STEP_INPUTS, cache_names, cache_type, latent_cache_name,
                               latent_cache_type)
from braze.ir.errors import BrazeError
from braze.ir.types import TensorType, dtype_name
from braze.models.primitives import PagedAttention, PagedLatentAttention

from .fx_ops import FUNCTIONS, METHODS


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True
        self._param_names: dict[int, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Linear, nn.Embedding, PagedAttention, PagedLatentAttention))

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # fx finds a parameter's name by scanning every parameter of the model on each
        # access (quadratic: ~40% of tracing a 48-layer MoE); look it up instead.
        if isinstance(attr_val, nn.Parameter):
            if self._param_names is None:
                self._param_names = {id(p): n for n, p in self.root.named_parameters()}
            name = self._param_names.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_TORCH_DIR = str(Path(torch.__file__).parent)


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()), None) if stack else None
    parts = []
    if module:
        path, cls = module
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        parts.append(f"module {path or '(root)'} ({cls_name.rsplit('.', 1)[-1]})")
    trace = (node.stack_trace or "").strip().splitlines()
    # the innermost frame that is the model's code, not torch's own tracing machinery
    files = [i for i, ln in enumerate(trace) if ln.strip().startswith("File ")
             and _TORCH_DIR not in ln]
    if files:
        i = files[-1]
        loc = trace[i].strip()
        code = trace[i + 1].strip() if i + 1 < len(trace) else ""
        parts.append(f"{loc}: {code}")
    return "; ".join(parts) or f"fx node {node.name}"


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    mod = getattr(t, "__module__", "") or ""
    return f"{mod}.{getattr(t, '__name__', str(t))}".lstrip(".")


class _Mapper:
    def __init__(self, model: nn.Module, graph: Graph, block_size: int, kv_dtype: str):
        self.model, self.g, self.block_size, self.kv_dtype = model, graph, block_size, kv_dtype
        self.modules = dict(model.named_modules())

    def param(self, name: str) -> Value:
        if name in self.g.params:
            return self.g.params[name]
        t = operator.attrgetter(name)(self.model)
        return self.g.add_param(name, TensorType(tuple(t.shape), dtype_name(t.dtype)))

    def call_module(self, target: str, args, kwargs):
        m = self.modules[target]
        g = self.g
        if isinstance(m, nn.Linear):
            operands = [args[0], self.param(f"{target}.weight")]
            if m.bias is not None:
                operands.append(self.param(f"{target}.bias"))
            return g.op("linear", *operands)
        if isinstance(m, nn.Embedding):
            return g.op("embedding", args[0], self.param(f"{target}.weight"))
        if isinstance(m, PagedAttention):
            q, k, v, slots, qsl, seq_lens, tables = args
            kc_name, vc_name = cache_names(m.cache_layer)
            ct = cache_type(self.block_size, m.num_kv_heads, m.head_dim, self.kv_dtype)
            if m.cache_layer == m.layer:
                kc, vc = g.add_input(kc_name, ct), g.add_input(vc_name, ct)
                g.add_node("cache_write", [k, v, kc, vc, slots])
            else:       # KV sharing: read an earlier layer's cache, write none
                kc, vc = self._shared_cache(m, kc_name, vc_name, ct)
            extra = {"softcap": float(m.softcap)} if m.softcap else {}
            return g.op("paged_attention", q, kc, vc, qsl, seq_lens, tables,
                        scale=float(m.scale), sliding_window=int(m.sliding_window), **extra)
        if isinstance(m, PagedLatentAttention):
            q, latent, w_kv_b, slots, qsl, seq_lens, tables = args
            cache = g.add_input(latent_cache_name(m.layer), latent_cache_type(
                self.block_size, m.kv_lora_rank + m.qk_rope_head_dim, self.kv_dtype))
            g.add_node("latent_cache_write", [latent, cache, slots])
            return g.op("mla_attention", q, cache, w_kv_b, qsl, seq_lens, tables,
                        scale=float(m.scale), kv_lora_rank=int(m.kv_lora_rank))
        raise BrazeError(f"no IR mapping for module type {type(m).__name__}")

    def _shared_cache(self, m: PagedAttention, kc_name: str, vc_name: str, ct: TensorType):
        names = {v.name: v for v in self.g.inputs}
        if kc_name not in names:
            raise BrazeError(f"layer {m.layer} shares the KV cache of layer {m.cache_layer}, "
                             f"which has not written one before it")
        kc, vc = names[kc_name], names[vc_name]
        if kc.type != ct:
            raise BrazeError(f"layer {m.layer} reads layer {m.cache_layer}'s cache {kc.type} "
                             f"as {ct}: the shared layers' head counts and head_dim differ")
        return kc, vc


def trace_to_ir(model: nn.Module, name: str, block_size: int, kv_dtype: str,
                log=None, extra_inputs: dict[str, TensorType] | None = None) -> Graph:
    """Trace `model.forward` (the batch contract) into a verified-shape IR graph.
    `extra_inputs`: forward() arguments beyond the contract (the MTP layer's hidden states)."""
    t0 = time.perf_counter()
    fx_graph = _Tracer().trace(model)
    t1 = time.perf_counter()
    g = Graph(name)
    for input_name, ty in STEP_INPUTS.items():
        g.add_input(input_name, ty)
    for input_name, ty in (extra_inputs or {}).items():
        g.add_input(input_name, ty)
    mapper = _Mapper(model, g, block_size, kv_dtype)
    env: dict[fx.Node, object] = {}
    for node in fx_graph.nodes:
        try:
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "placeholder":
                if node.target not in STEP_INPUTS and node.target not in (extra_inputs or {}):
                    raise BrazeError(f"forward() argument {node.target!r} is not part of the "
                                     f"batch contract ({', '.join(STEP_INPUTS)})")
                env[node] = g.input(node.target)
            elif node.op == "get_attr":
                env[node] = mapper.param(node.target)
            elif node.op == "call_module":
                env[node] = mapper.call_module(node.target, args, kwargs)
            elif node.op in ("call_function", "call_method"):
                table = FUNCTIONS if node.op == "call_function" else METHODS
                handler = table.get(node.target)
                if node.target is builtins.getattr:
                    raise BrazeError(f"the model reads tensor attribute .{args[1]} while tracing; "
                                     f"shapes are symbolic here: use -1 for the token dimension "
                                     f"and sizes from the config for the rest")
                if handler is None:
                    raise BrazeError(f"braze IR has no mapping for {_target_name(node)}")
                env[node] = handler(g, *args, **kwargs)
            elif node.op == "output":
                out = args[0]
                if isinstance(out, dict):
                    for k, v in out.items():
                        g.set_output(k, v)
                else:
                    g.set_output("logits", out)
        except BrazeError as e:
            raise BrazeError(f"cannot trace {type(model).__name__}: {e} (at {_where(node)})") from None
        except (TypeError, ValueError, IndexError) as e:
            raise BrazeError(f"cannot trace {type(model).__name__}: {_target_name(node)} called "
                             f"with unsupported arguments ({e}) (at {_where(node)})") from None
    if log:
        log(f"traced {len(fx_graph.nodes)} fx nodes in {t1 - t0:.2f}s, "
            f"mapped to {len(g.nodes)} IR nodes in {time.perf_counter() - t1:.2f}s")
    return g
