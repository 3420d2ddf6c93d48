"""LoRA adapters at run time: PEFT directories read, checked against the artifact's LoRA
contract, and swapped in and out of a fixed pool of device slots.

The artifact (compiled with `--lora-slots K --max-lora-rank R`, passes/add_lora.py)
declares, per targeted linear, two graph inputs: `lora_a.<pool>` [K, n*R, H] and
`lora_b.<pool>` [K, O, R], and the manifest's "lora" entry names each pool's parts
(the modules of a merged QKV / gate-up linear, with their output rows). Those pool
tensors are allocated once here and never move (CUDA graphs read them); loading an
adapter into slot s writes its matrices into row s of each pool.

Three levels, like vLLM's:
  registered  name -> (path, id): every adapter a request may name
  host        parsed adapters (pool-shaped CPU tensors, scale folded into B), an LRU of
              at most `max_cpu_loras`; one evicted from here is read from disk again
  device      K slots; an adapter in use by a running request is pinned, the rest are
              evicted least recently used first when a new one needs a slot

A request's adapter is acquired (loaded into a slot and pinned) when the scheduler
admits it and released when it leaves the running set (finished or preempted). An
admission finding every slot pinned waits, like one finding no KV blocks.

A tensor-parallel artifact's pools hold each rank's share (passes/add_lora.py): a
column-parallel module's B rows and a row-parallel one's A columns that the rank's
weight holds (the manifest's `parallel.shards` of `<module>.weight`). Adapters are read
and checked whole, then cut to the rank (`Contract.cut`). Rank 0's one LoRAManager
decides what goes in which slot and when; each slot write is sent to the other ranks
(runtime/parallel.py, between steps), which read the same adapter directory themselves,
cut their own share and write the same slot.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from braze.artifact import adapter_prefixes, text_only_origin
from braze.hub import download_advice, looks_like_repo_id
from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype

from .uploads import upload

SLOTS_INPUT = "lora_slots"
log = logging.getLogger("braze.runtime")


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's shape: a name requests use, a positive integer id, and the PEFT directory."""
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise BrazeError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) \
                or self.lora_int_id < 1:
            raise BrazeError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)) or not os.fspath(self.lora_path):
            raise BrazeError(f"lora_path must be the adapter's directory (a non-empty string "
                             f"or path), got {self.lora_path!r}")
        object.__setattr__(self, "lora_path", os.fspath(self.lora_path))


class LoRAError(BrazeError):
    """An adapter that cannot be served; `status` is the HTTP status a server answers with
    (400: the adapter is wrong for this artifact, 404: no such adapter or path)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Contract:
    """What the artifact's manifest says about LoRA."""
    slots: int
    max_rank: int
    targets: list[str]
    dtype: str
    modules: dict           # pool -> {"parts": [[module, rows]], "targeted": [...], "in": H}
    untargeted: list        # LoRA-capable modules --lora-targets left out
    # compiled text-only from a multimodal checkpoint: that architecture, and the adapter
    # module prefixes of its language model (-> the text model's) and towers (-> None)
    origin: str | None = None
    prefixes: dict = field(default_factory=dict)
    # tensor parallelism: the weights' shard records (param -> {"dim", "ranges"}) and
    # this process's rank, whose share of each adapter the pools hold
    shards: dict = field(default_factory=dict)
    rank: int = 0

    @classmethod
    def from_manifest(cls, manifest: dict, rank: int = 0) -> "Contract | None":
        got = manifest.get("lora")
        if not got:
            return None
        try:
            return cls(int(got["slots"]), int(got["max_rank"]), list(got["targets"]),
                       str(got["dtype"]), dict(got["modules"]), list(got.get("untargeted", [])),
                       text_only_origin(manifest), adapter_prefixes(manifest),
                       dict((manifest.get("parallel") or {}).get("shards") or {}), int(rank))
        except (KeyError, TypeError, ValueError) as e:
            raise BrazeError(f"the artifact's manifest has a malformed \"lora\" entry ({e}); "
                             f"recompile it") from None

    def _split(self, module: str, dim: int) -> dict | None:
        """The shard record of `module`'s weight when it is split along `dim`."""
        spec = self.shards.get(f"{module}.weight")
        return spec if spec and "ranges" in spec and spec["dim"] == dim else None

    def whole(self, module: str, dim: int, local: int) -> int:
        """The size of dim `dim` (0: output rows, 1: input) of `module`'s whole weight, whose
        rank's share is `local`: what an adapter (trained on the whole model) has."""
        spec = self._split(module, dim)
        return local if spec is None else max(b for _, b in spec["ranges"])

    def cut(self, module: str, a: torch.Tensor, b: torch.Tensor):
        """An adapter's whole (A [r, in], B [out, r]) of `module` -> this rank's share: B's
        rows of a column-parallel weight, A's columns of a row-parallel one."""
        rows, cols = self._split(module, 0), self._split(module, 1)
        if rows is not None:
            lo, hi = rows["ranges"][self.rank]
            b = b[lo:hi]
        if cols is not None:
            lo, hi = cols["ranges"][self.rank]
            a = a[:, lo:hi]
        return a, b

    def part_of(self) -> dict[str, tuple[str, int, int, int, bool]]:
        """module -> (pool, part index, first output row, rows, targeted)."""
        out = {}
        for pool, m in self.modules.items():
            off = 0
            for j, (mod, rows) in enumerate(m["parts"]):
                out[mod] = (pool, j, off, rows, mod in m["targeted"])
                off += rows
        return out


@dataclass
class HostAdapter:
    """An adapter parsed into pool-shaped host tensors: per pool (a [n*R, H], b [O, R])."""
    name: str
    rank: int
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    modules: list[str]
    ignored: list[str] = field(default_factory=list)    # tower modules (see _text_modules)


def _peft_module(key: str) -> tuple[str, str] | None:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ->
    ("model.layers.0.self_attn.q_proj", "A")."""
    for which in ("A", "B"):
        for tail in (f".lora_{which}.weight", f".lora_{which}.default.weight"):
            if key.endswith(tail):
                mod = key[:-len(tail)]
                for prefix in ("base_model.model.",):
                    if mod.startswith(prefix):
                        mod = mod[len(prefix):]
                return mod, which
    return None


def _text_modules(name: str, found: dict, contract: Contract) -> tuple[dict, list[str]]:
    """An adapter trained on the multimodal model whose language model the artifact is:
    its language model's modules under the text model's names, and its tower and projector
    modules set aside. Those act on image and audio input only, which a text-only artifact
    never takes, so on text the adapter computes the same without them; an adapter with
    nothing but those would change nothing here, and is refused."""
    if not contract.prefixes:
        return found, []
    out, ignored = {}, []
    for mod, ab in found.items():
        prefix = max((p for p in contract.prefixes if mod.startswith(p)), key=len, default=None)
        if prefix is None:
            out[mod] = ab                  # the text model's own name, or refused by name below
        elif contract.prefixes[prefix] is None:
            ignored.append(mod)
        else:
            ours = contract.prefixes[prefix] + mod[len(prefix):]
            if ours in out or ours in found:
                raise LoRAError(f"LoRA adapter {name!r} holds module {ours} twice (as {mod} "
                                f"and under another name); save it again with peft")
            out[ours] = ab
    ignored.sort()
    if ignored and not out:
        towers = sorted({p for p, v in contract.prefixes.items() if v is None
                         and any(m.startswith(p) for m in ignored)})
        raise LoRAError(f"LoRA adapter {name!r} targets only modules under {', '.join(towers)} "
                        f"(e.g. {ignored[0]}) of {contract.origin}, and this artifact is its "
                        f"language model compiled text-only, which the adapter would not change; "
                        f"serve an adapter that targets the language model's modules")
    if ignored:
        log.warning("LoRA adapter %r: %d module(s) of %s's towers ignored (e.g. %s): the "
                    "artifact is text-only and never runs them", name, len(ignored),
                    contract.origin, ignored[0])
    return out, ignored


# a checkpoint's fused projection (Phi-3's) -> the projections braze's models split it into
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _split_fused(name: str, found: dict, where: dict, contract: Contract) -> None:
    """An adapter for a fused projection (`qkv_proj`) on a model whose graph has the parts
    (`q_proj`, `k_proj`, `v_proj`, split from the fused weight at load): each part gets
    the adapter's A and its rows of B, which is the same delta."""
    for mod in [m for m in found if m not in where and m not in contract.untargeted]:
        prefix, _, short = mod.rpartition(".")
        parts = [f"{prefix}.{p}" for p in FUSED.get(short, ())]
        if not parts or not all(p in where or p in contract.untargeted for p in parts):
            continue
        missing = [p for p in parts if p not in where or not where[p][4]]
        if missing:
            raise LoRAError(f"LoRA adapter {name!r} targets {mod}, whose parts "
                            f"{', '.join(missing)} the artifact did not target (compiled with "
                            f"--lora-targets {','.join(contract.targets)}); recompile with "
                            f"them included")
        ab = found.pop(mod)
        rows = [contract.whole(p, 0, where[p][3]) for p in parts]
        b = ab.get("B")
        if b is None or "A" not in ab or b.shape[0] != sum(rows):
            raise LoRAError(f"LoRA adapter {name!r}: module {mod} has lora_B "
                            f"{None if b is None else tuple(b.shape)}; this model's parts want "
                            f"{sum(rows)} rows ({' + '.join(map(str, rows))})")
        off = 0
        for p, n in zip(parts, rows):
            found[p] = {"A": ab["A"], "B": b[off:off + n]}
            off += n


PEFT_LORA_ALPHA = 8          # peft's LoraConfig default lora_alpha


def read_adapter(name: str, path, contract: Contract) -> HostAdapter:
    """Read a PEFT adapter directory ("~" is the user's home, as in vLLM) and lay it out as
    the artifact's pools want it. A path the OS refuses is a LoRAError, as a missing one."""
    try:
        return _read_adapter(name, Path(path).expanduser(), contract)
    except OSError as e:
        where = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        gone = e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG)
        raise LoRAError(f"LoRA adapter {name!r}: cannot read {where!r} ({e.strerror or e})",
                        404 if gone else 400) from None


def _read_adapter(name: str, d: Path, contract: Contract) -> HostAdapter:
    path = d
    cfg_path = d / "adapter_config.json"
    if not d.exists() and looks_like_repo_id(str(path)):
        raise LoRAError(f"LoRA adapter {name!r}: no directory {str(path)!r}; braze reads "
                        f"adapters from local directories: to serve the Hugging Face "
                        f"repository {path}, {download_advice(str(path))} and give DIR", 404)
    if not d.is_dir() or not cfg_path.is_file():
        # peft's save_pretrained puts each adapter not named "default" in a subdirectory
        subs = sorted(str(c) for c in d.iterdir() if (c / "adapter_config.json").is_file()) \
            if d.is_dir() else []
        hint = (f"; its subdirectories {', '.join(subs[:8])}{', ...' if len(subs) > 8 else ''} "
                f"hold adapters (peft saves each named adapter in its own): give one of them"
                if subs else "")
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_config.json in {str(path)!r} (a "
                        f"PEFT adapter directory holds adapter_config.json and "
                        f"adapter_model.safetensors){hint}", 404)
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise LoRAError(f"LoRA adapter {name!r}: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoRAError(f"LoRA adapter {name!r}: {cfg_path} holds a {type(cfg).__name__}, not "
                        f"a JSON object (peft's LoraConfig: r, lora_alpha, target_modules, ...)")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        if (d / "adapter_model.bin").exists():     # there, in a format braze does not load
            raise LoRAError(f"LoRA adapter {name!r}: {str(path)!r} holds adapter_model.bin, a "
                            f"pickle, which braze does not load; save the adapter again as "
                            f"adapter_model.safetensors (peft: save_pretrained(..., "
                            f"safe_serialization=True))")
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_model.safetensors in "
                        f"{str(path)!r}", 404)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"LoRA adapter {name!r}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False),
                    ("lora_bias", False)):
        if cfg.get(key, ok) not in (ok, None):
            raise LoRAError(f"LoRA adapter {name!r}: {key}={cfg.get(key)!r} is not supported "
                            f"(braze serves plain LoRA: {key}={ok!r})")
    if cfg.get("target_parameters"):
        raise LoRAError(f"LoRA adapter {name!r} has target_parameters "
                        f"{cfg['target_parameters']!r}: LoRA on parameters (peft's way to an "
                        f"MoE layer's experts) is not supported; braze serves LoRA on the "
                        f"linear layers the artifact was compiled for (--lora-targets "
                        f"{','.join(contract.targets)}): train the adapter with "
                        f"target_modules only")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise LoRAError(f"LoRA adapter {name!r}: {key} is not supported yet "
                            f"(got {cfg.get(key)!r})")
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha", PEFT_LORA_ALPHA)     # absent: peft's default, as peft reads it
    if (not isinstance(r, int) or isinstance(r, bool) or r < 1
            or not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
            or not math.isfinite(alpha)):
        raise LoRAError(f"LoRA adapter {name!r}: adapter_config.json needs a positive integer "
                        f"r and a finite number lora_alpha, got r={r!r}, lora_alpha={alpha!r}")
    if r > contract.max_rank:
        raise LoRAError(f"LoRA adapter {name!r} has rank {r}, more than the artifact's "
                        f"--max-lora-rank {contract.max_rank}; recompile with --max-lora-rank "
                        f"{r} or more")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    from safetensors import SafetensorError, safe_open
    found: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                got = _peft_module(key)
                if got is None:
                    raise LoRAError(_not_lora_weight(name, key, contract))
                found.setdefault(got[0], {})[got[1]] = f.get_tensor(key)
    except SafetensorError as e:
        raise LoRAError(f"LoRA adapter {name!r}: {weights} is not a readable safetensors file "
                        f"({e})") from None
    if not found:
        raise LoRAError(f"LoRA adapter {name!r}: {weights} holds no LoRA weights")
    found, ignored = _text_modules(name, found, contract)
    where = contract.part_of()
    _split_fused(name, found, where, contract)
    R = contract.max_rank
    dtype = torch_dtype(contract.dtype)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for mod in sorted(found):
        ab = found[mod]
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"LoRA adapter {name!r}: module {mod} has lora_{''.join(ab)} "
                            f"but not both lora_A and lora_B")
        if mod in contract.untargeted or (mod in where and not where[mod][4]):
            raise LoRAError(f"LoRA adapter {name!r} targets {mod}, but the artifact was "
                            f"compiled with --lora-targets {','.join(contract.targets)}; "
                            f"recompile with its module included")
        if mod not in where:
            raise LoRAError(_unknown_module(name, mod, where, contract))
        pool, j, off, rows, _ = where[mod]
        a, b = ab["A"], ab["B"]
        H = contract.modules[pool]["in"]
        want_a, want_b = (r, contract.whole(mod, 1, H)), (contract.whole(mod, 0, rows), r)
        if a.shape != want_a or b.shape != want_b:
            raise LoRAError(f"LoRA adapter {name!r}: module {mod} has lora_A {tuple(a.shape)} "
                            f"and lora_B {tuple(b.shape)}; this model wants {want_a} and "
                            f"{want_b} (an adapter for another model?)")
        a, b = contract.cut(mod, a, b)          # this rank's share (tensor parallelism)
        if pool not in tensors:
            n = len(contract.modules[pool]["parts"])
            O = sum(p[1] for p in contract.modules[pool]["parts"])
            tensors[pool] = (torch.zeros(n * R, H, dtype=dtype), torch.zeros(O, R, dtype=dtype))
        pa, pb = tensors[pool]
        pa[j * R:j * R + r] = a.to(dtype)
        pb[off:off + rows, :r] = (b.float() * scale).to(dtype)
    return HostAdapter(name, r, tensors, sorted(found), ignored)


# modules peft can put LoRA on (target_modules) that braze serves none on: it saves their
# lora_embedding_A/B, or lora_A/B, and their whole weight (`.base_layer.weight`)
EMBEDDINGS = ("embed_tokens", "lm_head")


def _embedding_refusal(name: str, mod: str, contract: Contract) -> str:
    short = mod.rsplit(".", 1)[-1]
    return (f"LoRA adapter {name!r} targets {mod}, and braze serves LoRA only on the linear "
            f"layers the artifact was compiled for (--lora-targets "
            f"{','.join(contract.targets)}), not on the embeddings or the LM head; train the "
            f"adapter without {short} in target_modules")


def _not_lora_weight(name: str, key: str, contract: Contract) -> str:
    """The error for an adapter tensor that is no lora_A/lora_B weight."""
    mod = key.removeprefix("base_model.model.")
    for tail in (".lora_embedding_A", ".lora_embedding_B", ".base_layer.weight"):
        mod = mod.removesuffix(tail)
    if mod.rsplit(".", 1)[-1] in EMBEDDINGS:
        return _embedding_refusal(name, mod, contract)
    return (f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B weight (only "
            f"lora_A/lora_B weights are supported)")


def _unknown_module(name: str, mod: str, where: dict, contract: Contract) -> str:
    """The error for an adapter module the artifact has no LoRA slot for."""
    short = mod.rsplit(".", 1)[-1]
    if short in EMBEDDINGS:
        return _embedding_refusal(name, mod, contract)
    known = sorted({m.rsplit(".", 1)[-1] for m in list(where) + contract.untargeted})
    if short not in known:
        return (f"LoRA adapter {name!r} targets module {mod}, which this model has no "
                f"LoRA-capable linear for ({short!r} is not among {', '.join(known)})")
    if contract.origin and not contract.prefixes:
        return (f"LoRA adapter {name!r} targets module {mod}; this artifact is the language "
                f"model of {contract.origin}, compiled before braze mapped such adapters' "
                f"names; recompile it")
    if contract.origin:
        lm = sorted(p for p, v in contract.prefixes.items() if v == "model.")
        return (f"LoRA adapter {name!r} targets module {mod}, which is neither in this "
                f"artifact (the language model of {contract.origin}, compiled text-only: "
                f"{' or '.join(lm)}...) nor in one of that model's towers (an adapter for "
                f"another model?)")
    return (f"LoRA adapter {name!r} targets module {mod}, which this model does not have "
            f"(an adapter for another model?)")


class LoRAManager:
    """The registered adapters, their host copies and the K device slots.

    Each registration gets a key, ("lora", name, n): requests hold the key, the slots and
    host copies are keyed by it, and the KV prefix cache chains from it, so an adapter
    unloaded and loaded again under its old name never meets the old one's slot or KV."""

    def __init__(self, contract: Contract, pools: dict[str, torch.Tensor],
                 max_cpu_loras: int | None = None):
        self.contract = contract
        self.pools = pools                 # graph input name -> device tensor (never replaced)
        self.max_cpu_loras = max(max_cpu_loras or contract.slots, contract.slots)
        self.registered: dict[str, tuple[LoRARequest, tuple]] = {}
        self._known: dict[tuple, LoRARequest] = {}       # every key a request may hold
        self._host: OrderedDict[tuple, HostAdapter] = OrderedDict()
        self._slot_of: dict[tuple, int] = {}
        self._holder: list[tuple | None] = [None] * contract.slots
        self._pins: list[int] = [0] * contract.slots
        self._lru: OrderedDict[tuple, None] = OrderedDict()   # resident, unpinned, oldest first
        self._loads = 0
        self._refs: dict[tuple, int] = {}              # key -> requests holding it
        # tensor parallelism: rank 0 sends each slot write to the other ranks (parallel.py)
        self.on_write = None                # (slot, LoRARequest) -> None
        self.stats = {"lora_loads_to_device": 0, "lora_reads_from_disk": 0,
                      "lora_evictions": 0}

    # -- registry -------------------------------------------------------------------

    def read(self, req: LoRARequest) -> HostAdapter:
        """Read and check an adapter without registering it (any thread: the server reads
        off the engine thread, then registers with `add(req, host)`)."""
        return read_adapter(req.lora_name, req.lora_path, self.contract)

    def add(self, req: LoRARequest, host: HostAdapter | None = None,
            replace: bool = False) -> tuple:
        """Register an adapter (reading and checking it now unless `host` is its `read`, so
        a bad one fails here); returns its key. The same request again is a no-op.
        `replace`: an adapter registered under the name is replaced (as `remove` then add,
        once the new one has been read: requests holding the old one finish with it)."""
        old = self.registered.get(req.lora_name)
        if old is not None:
            if old[0] == req:
                return old[1]
            if not replace:
                raise LoRAError(f"LoRA adapter {req.lora_name!r} is already loaded from "
                                f"{old[0].lora_path!r} (lora_int_id {old[0].lora_int_id}); "
                                f"unload it first or pick another name")
            if host is None:
                host = self.read(req)          # a bad adapter leaves the old one in place
            self.remove(req.lora_name)
        self._loads += 1
        key = ("lora", req.lora_name, self._loads)
        if host is not None:
            self._host[key] = host
            self.stats["lora_reads_from_disk"] += 1
            while len(self._host) > self.max_cpu_loras:
                self._host.popitem(last=False)
        else:
            self._host_copy(key, req)
        self.registered[req.lora_name] = (req, key)
        self._known[key] = req
        return key

    def key(self, name: str) -> tuple:
        got = self.registered.get(name)
        if got is None:
            raise LoRAError(f"LoRA adapter {name!r} is not loaded", 404)
        return got[1]

    def remove(self, name: str) -> None:
        """Unregister: requests already holding it finish with it; new ones cannot name it."""
        _, key = self.registered.pop(name, (None, None))
        if key is None:
            raise LoRAError(f"LoRA adapter {name!r} is not loaded", 404)
        slot = self._slot_of.get(key)
        if slot is not None and self._pins[slot] == 0:
            self._lru.pop(key, None)
            self._free(key)
        if not self._refs.get(key):
            self._known.pop(key, None)
            self._host.pop(key, None)

    def hold(self, name: str) -> tuple:
        """A new request names adapter `name`: its key, held until `unhold`."""
        return self.hold_key(self.key(name))

    def hold_key(self, key: tuple) -> tuple:
        """Hold a key already held (a beam search's next step keeps the version of the
        adapter it started with, even once that is unloaded or replaced)."""
        if key not in self._known:
            raise LoRAError(f"LoRA adapter {key[1]!r} is not loaded", 404)
        self._refs[key] = self._refs.get(key, 0) + 1
        return key

    def unhold(self, key: tuple) -> None:
        """A request holding `key` finished: an unloaded adapter no request holds is gone."""
        n = self._refs.get(key, 0) - 1
        if n > 0:
            self._refs[key] = n
            return
        self._refs.pop(key, None)
        if self.registered.get(key[1], (None, None))[1] != key:
            self._known.pop(key, None)
            self._host.pop(key, None)

    def _host_copy(self, key: tuple, req: LoRARequest) -> HostAdapter:
        host = self._host.get(key)
        if host is not None:
            self._host.move_to_end(key)
            return host
        host = read_adapter(req.lora_name, req.lora_path, self.contract)
        self.stats["lora_reads_from_disk"] += 1
        self._host[key] = host
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
        return host

    # -- slots ----------------------------------------------------------------------

    def slot_of(self, key: tuple) -> int | None:
        return self._slot_of.get(key)

    def acquire(self, key: tuple) -> int | None:
        """Pin the adapter in a slot (loading it if it is not resident) and return the
        slot; None when every slot is pinned by running requests (the caller waits).
        LoRAError when it must be read from disk again and cannot be (its files gone)."""
        slot = self._slot_of.get(key)
        if slot is None:
            req = self._known.get(key)
            if req is None:
                raise LoRAError(f"LoRA adapter {key[1]!r} is not loaded", 404)
            # read first (from disk if its host copy was evicted): one that cannot be read
            # now raises LoRAError with no slot emptied for it
            try:
                host = self._host_copy(key, req)
            except LoRAError as e:
                raise LoRAError(f"{e}; it had left the host cache of {self.max_cpu_loras} "
                                f"adapters (max_cpu_loras) and was read again from disk: "
                                f"restore its files, or load it again from where they are "
                                f"now", e.status) from None
            if None in self._holder:
                slot = self._holder.index(None)
            elif self._lru:
                victim, _ = self._lru.popitem(last=False)
                slot = self._free(victim)
                self.stats["lora_evictions"] += 1
            else:
                return None
            self._write(slot, host, req)
            self._slot_of[key] = slot
            self._holder[slot] = key
        self._lru.pop(key, None)
        self._pins[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        """A request that held `slot` left the running set."""
        self._pins[slot] -= 1
        if self._pins[slot]:
            return
        key = self._holder[slot]
        if self.registered.get(key[1], (None, None))[1] == key:
            self._lru[key] = None            # resident, evictable
        else:
            self._free(key)                  # unloaded while it ran

    @property
    def max_loras(self) -> int:
        """The adapters one batch may hold: the artifact's slots, or vLLM's max_loras."""
        return len(self._holder)

    def use_slots(self, n: int) -> None:
        """vLLM's max_loras below the artifact's slots: adapters go to the first `n` only,
        so at most `n` run in one batch (set before any request takes a slot)."""
        if any(h is not None for h in self._holder[n:]):
            raise BrazeError("max_loras is set before any adapter takes a slot")
        del self._holder[n:], self._pins[n:]

    def in_use(self) -> dict[str, int]:
        """Adapter name -> running requests using it."""
        out: dict[str, int] = {}
        for s, n in enumerate(self._pins):
            if n:
                out[self._holder[s][1]] = out.get(self._holder[s][1], 0) + n
        return out

    def _free(self, key: tuple) -> int:
        slot = self._slot_of.pop(key)
        self._holder[slot] = None
        return slot

    def _write(self, slot: int, host: HostAdapter, req: LoRARequest) -> None:
        if self.on_write is not None:       # the other ranks first: they read from disk
            self.on_write(slot, req)
        write_slot(self.pools, self.contract, slot, host)
        self.stats["lora_loads_to_device"] += 1


def write_slot(pools: dict[str, torch.Tensor], contract: Contract, slot: int,
               host: HostAdapter) -> None:
    """The adapter's matrices into row `slot` of every pool (zeros where it has none)."""
    for pool in contract.modules:
        a = pools[f"lora_a.{pool}"]
        b = pools[f"lora_b.{pool}"]
        got = host.tensors.get(pool)
        if got is None:
            a[slot].zero_()
            b[slot].zero_()
        else:       # pinned first: from pageable memory the copy waits for the stream
            a[slot].copy_(upload(got[0], a.device))
            b[slot].copy_(upload(got[1], b.device))


def allocate_pools(graph, device) -> dict[str, torch.Tensor]:
    """Zeroed device tensors for the graph's `lora_a.*` / `lora_b.*` inputs."""
    return {v.name: torch.zeros(tuple(int(d) for d in v.type.shape),
                                dtype=torch_dtype(v.type.dtype), device=device)
            for v in graph.inputs if v.name.startswith(("lora_a.", "lora_b."))}


def add_slots_buffer(static: dict, executor) -> None:
    """A LoRA artifact's extra step input among the static buffers: each token's adapter
    slot (-1: none)."""
    if executor.lora_pools:
        static[SLOTS_INPUT] = torch.full((int(static["input_ids"].shape[0]),), -1,
                                         dtype=torch.int32, device=executor.device)


# vLLM's LLM() LoRA options: in braze the artifact fixes them (`braze compile --lora-slots K
# --max-lora-rank R`), so braze.LLM takes them as checks of what it was compiled with, and
# max_loras below the slots as the adapters one batch may hold
VLLM_OPTIONS = ("enable_lora", "max_loras", "max_lora_rank")


def apply_vllm_options(lora: "LoRAManager | None", root, enable_lora=None, max_loras=None,
                       max_lora_rank=None) -> None:
    """`check_vllm_options` on the engine's LoRA manager (None: the artifact serves none),
    then max_loras bounds the slots its batches use."""
    check_vllm_options(getattr(lora, "contract", None), root, enable_lora, max_loras,
                       max_lora_rank)
    if max_loras is not None and lora is not None:
        lora.use_slots(max_loras)


def check_vllm_options(contract: Contract | None, root, enable_lora=None, max_loras=None,
                       max_lora_rank=None) -> None:
    """BrazeError, naming the compile flag, where the artifact at `root` cannot serve what
    vLLM's enable_lora / max_loras / max_lora_rank ask for (less than it can do is fine)."""
    if enable_lora not in (None, True, False):
        raise BrazeError(f"enable_lora must be True or False, got {enable_lora!r}")
    for key, v in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise BrazeError(f"{key} must be a positive integer, got {v!r}")
    if contract is None:
        asked = [f"{k}={v!r}" for k, v in (("enable_lora", enable_lora), ("max_loras", max_loras),
                                           ("max_lora_rank", max_lora_rank))
                 if v not in (None, False)]
        if asked:
            raise BrazeError(f"{', '.join(asked)}: artifact {root} serves no LoRA adapters; "
                             f"braze compiles LoRA in: braze compile MODEL -o ARTIFACT "
                             f"--lora-slots K --max-lora-rank R")
        return
    if max_loras is not None and max_loras > contract.slots:
        raise BrazeError(f"max_loras={max_loras}: artifact {root} was compiled with "
                         f"--lora-slots {contract.slots}, the adapters it runs at once; "
                         f"recompile with --lora-slots {max_loras}")
    if max_lora_rank is not None and max_lora_rank > contract.max_rank:
        raise BrazeError(f"max_lora_rank={max_lora_rank}: artifact {root} was compiled with "
                         f"--max-lora-rank {contract.max_rank}; recompile with --max-lora-rank "
                         f"{max_lora_rank}")


class EngineLoRA:
    """The Engine's LoRA face (runtime/engine.py mixes it in): adapters registered and
    removed at run time, and requests tied to one."""

    lora: LoRAManager | None = None

    def _init_lora(self, max_cpu_loras: int | None) -> None:
        contract = Contract.from_manifest(self.artifact.manifest)
        if contract is None:
            if max_cpu_loras is not None:
                raise BrazeError("max_cpu_loras is set but the artifact serves no LoRA "
                                 "adapters; compile it with --lora-slots K")
            return
        self.lora = LoRAManager(contract, self.runner.executor.lora_pools, max_cpu_loras)
        self.scheduler.lora = self.lora
        from .parallel import LeaderGraphs
        if isinstance(self.runner.graphs, LeaderGraphs):     # tensor-parallel rank 0
            self.lora.on_write = self.runner.graphs.write_lora

    def _need_lora(self) -> LoRAManager:
        if self.lora is None:
            raise LoRAError(f"artifact {self.artifact.root} serves no LoRA adapters; compile "
                            f"it with --lora-slots K (and --max-lora-rank R)")
        return self.lora

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Register an adapter: read, checked and kept in host memory; it goes to a device
        slot when a request uses it."""
        self._need_lora().add(lora_request)

    def remove_lora(self, name: str) -> None:
        """Unregister an adapter: requests already using it finish; new ones fail."""
        self._need_lora().remove(name)

    def list_loras(self) -> list[LoRARequest]:
        return [r for r, _ in self.lora.registered.values()] if self.lora is not None else []

    def _bind_lora(self, req, lora_request) -> None:
        """Tie a new request to its adapter (a LoRARequest, registered here if new, the
        name of one registered, or a key `LoRAManager.hold` gave, still held)."""
        if not isinstance(lora_request, (LoRARequest, str, tuple)):
            raise BrazeError(f"lora_request must be a LoRARequest or an adapter name, got "
                             f"{type(lora_request).__name__}", param="lora_request")
        mgr = self._need_lora()
        if isinstance(lora_request, tuple):
            self._bind_key(req, mgr.hold_key(lora_request))
            return
        if isinstance(lora_request, LoRARequest):
            # as in vLLM, the lora_int_id names the adapter's version: a new one under a
            # registered name (an RL loop's next checkpoint) replaces it
            old = mgr.registered.get(lora_request.lora_name)
            mgr.add(lora_request, replace=old is not None
                    and old[0].lora_int_id != lora_request.lora_int_id)
            lora_request = lora_request.lora_name
        self._bind_key(req, mgr.hold(lora_request))

    def _bind_key(self, req, key: tuple) -> None:
        req.lora = req.kv_salt = key
        if self.offload is not None:          # lower KV tiers key blocks by tokens alone
            from .kv_offload import KVTransferPolicy
            req.kv_policy = KVTransferPolicy.of({"max_load_tokens": 0, "store": False})

    def _unbind_lora(self, req) -> None:
        if req.lora is not None and self.lora is not None:
            self.lora.unhold(req.lora)
