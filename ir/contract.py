"""The batch contract: the inputs every model graph takes, by name and type.

One step of any batch (prefill and decode sequences mixed) is described by:

    input_ids        i64[T]      token ids; padding tokens past query_start_loc[S] are ignored
    positions        i64[T]      position of each token in its sequence
    slot_mapping     i64[T]      KV-cache slot of each token; -1 = padding, not written
    query_start_loc  i32[S + 1]  offsets of each sequence's new tokens in the step
    seq_lens         i32[S]      each sequence's length after this step (cached + new)
    block_tables     i32[S, MB]  each sequence's cache blocks, in order
    logits_indices   i64[R]      the token rows whose logits are computed (the last token of
                                 each sequence; all k + 1 rows of a speculative verification)

plus one cache pair per layer, `k_cache.L` and `v_cache.L`, each
`[NB, block_size, num_kv_heads, head_dim]` in the model dtype; or, for a layer with
multi-head latent attention (DeepSeek-V3), one `kv_latent.L`
`[NB, block_size, 1, kv_lora_rank + qk_rope_head_dim]` (ir/op_mla.py).
A model with sliding-window and full-attention layers has one KV cache group per kind
(the manifest's `kv_groups`); group g > 0 reads its own `slot_mapping.g<g>` and
`block_tables.g<g>` (`group_step_inputs`, docs/batch-contract.md).
The compiled kernels and the runtime use this same contract.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import BrazeError
from .types import MB, NB, R, S, T, TensorType

STEP_INPUTS: dict[str, TensorType] = {
    "input_ids": TensorType((T,), "i64"),
    "positions": TensorType((T,), "i64"),
    "slot_mapping": TensorType((T,), "i64"),
    "query_start_loc": TensorType((S + 1,), "i32"),
    "seq_lens": TensorType((S,), "i32"),
    "block_tables": TensorType((S, MB), "i32"),
    "logits_indices": TensorType((R,), "i64"),
}


def cache_names(layer: int) -> tuple[str, str]:
    return f"k_cache.{layer}", f"v_cache.{layer}"


def cache_type(block_size: int, num_kv_heads: int, head_dim: int, dtype: str) -> TensorType:
    return TensorType((NB, block_size, num_kv_heads, head_dim), dtype)


def latent_cache_name(layer: int) -> str:
    return f"kv_latent.{layer}"


def latent_cache_type(block_size: int, row: int, dtype: str) -> TensorType:
    return TensorType((NB, block_size, 1, row), dtype)


CACHE_PREFIXES = ("k_cache.", "v_cache.", "kv_latent.")    # the graph inputs that are KV caches


def group_step_inputs(group: int) -> dict[str, TensorType]:
    """The slot mapping and block table of KV cache group `group` > 0 (a sliding-window
    group of a hybrid cache, runtime/hybrid_cache.py): group 0 reads `slot_mapping` and
    `block_tables`, group g these. Each group's block ids index its own layers' caches."""
    if group < 1:
        raise BrazeError(f"KV cache group {group} reads the contract's own slot_mapping and "
                         f"block_tables")
    return {f"slot_mapping.g{group}": STEP_INPUTS["slot_mapping"],
            f"block_tables.g{group}": STEP_INPUTS["block_tables"]}


def group_of_step_input(name: str) -> tuple[str, int] | None:
    """("slot_mapping" or "block_tables", g) for a group's step input name, else None."""
    base, _, g = name.partition(".g")
    if base in ("slot_mapping", "block_tables") and g.isdigit() and int(g) > 0:
        return base, int(g)
    return None


def default_buckets(max_num_tokens: int) -> list[int]:
    """The padded token counts steps run at: 1, 2, 4, then every 8 up to 256, every 16 up
    to 512, every 32 up to 1024, then 8 per doubling (at most 12.5% padding); capped at and
    always including the maximum. The compiler specialises kernels for these sizes and the
    runtime captures a CUDA graph for each."""
    out, b = [1, 2, 4], 8
    while b < max_num_tokens:
        out.append(b)
        if b < 256:
            b += 8
        elif b < 512:
            b += 16
        elif b < 1024:
            b += 32
        else:
            b += (1 << (b.bit_length() - 1)) // 8
    out = [x for x in out if x < max_num_tokens]
    return out + [max_num_tokens]


def bucket_sizes(tokens: int, max_num_seqs: int, max_blocks: int,
                 max_logits_rows: int | None = None) -> dict[str, int]:
    """The step symbols of a bucket of `tokens` padded tokens: at most one sequence per token,
    at most one logits row per token (R = S unless the artifact has more logits rows)."""
    rows = max_num_seqs if max_logits_rows is None else max(max_logits_rows, max_num_seqs)
    return {"T": tokens, "S": min(tokens, max_num_seqs), "MB": max_blocks,
            "R": min(tokens, rows)}


@dataclass(frozen=True)
class StepLimits:
    """The largest step an artifact serves, fixed when it is compiled: the static arena,
    the step buffers and the specialised kernels are sized by these, so compile records
    them once in the manifest ("limits") and the runtime reads them from there. The
    defaults here are the compiler's defaults (braze/config.py takes them from here)."""

    max_num_tokens: int = 8192          # T: tokens in one step
    max_num_seqs: int = 256             # S: sequences in one step
    max_model_len: int = 2048           # the longest sequence, prompt + output
    block_size: int = 16                # tokens per KV-cache block
    # R: logits rows in one step (the LM head's rows after prune-logits). None: one per
    # sequence (max_num_seqs). Speculative decoding with k proposed tokens verifies k + 1
    # rows per sequence: max_num_seqs * (k + 1) serves every sequence at once.
    max_logits_rows: int | None = None

    def __post_init__(self) -> None:
        if self.max_logits_rows is None:
            object.__setattr__(self, "max_logits_rows", self.max_num_seqs)

    @property
    def max_blocks(self) -> int:
        """MB: the block table's width, the blocks of one longest sequence."""
        return -(-self.max_model_len // self.block_size)

    def bindings(self) -> dict[str, int]:
        """The step symbols at their largest."""
        return {"T": self.max_num_tokens, "S": self.max_num_seqs, "MB": self.max_blocks,
                "R": max(self.max_logits_rows, self.max_num_seqs)}

    @classmethod
    def from_options(cls, options: dict) -> "StepLimits":
        """From compile options (missing or None entries take the defaults)."""
        return cls(**{k: int(options[k]) for k in cls.__dataclass_fields__
                      if options.get(k) is not None})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, manifest: dict, where: str) -> "StepLimits":
        """The limits an artifact was compiled for, exactly as recorded: no defaults."""
        got = manifest.get("limits")
        if isinstance(got, dict) and "max_logits_rows" not in got:
            got = {**got, "max_logits_rows": got.get("max_num_seqs")}   # compiled before R
        if not isinstance(got, dict) or set(got) != set(cls.__dataclass_fields__) or not all(
                isinstance(v, int) and v > 0 for v in got.values()):
            raise BrazeError(f"{where} records no valid step limits ({got!r}); recompile it "
                             f"with this braze")
        return cls(**got)


# -- the reference construction of a step's inputs -------------------------------------------
# The runtime builds these on the device, into static buffers, from its persistent batch
# (runtime/input_batch.py); this host-side builder is the contract written as plain code,
# the oracle tests and benchmarks build steps with.

@dataclass
class SeqChunk:
    token_ids: list[int]        # the new tokens of this step
    num_computed: int           # tokens of the sequence already in the cache
    block_table: list[int]      # the sequence's cache blocks (enough for all its tokens)


def build_step(chunks: list[SeqChunk], block_size: int, max_blocks: int | None = None,
               pad_to: int | None = None, device="cpu") -> dict[str, torch.Tensor]:
    ids, positions, slots, qsl, seq_lens = [], [], [], [0], []
    width = max_blocks or max((len(c.block_table) for c in chunks), default=1) or 1
    tables = torch.zeros(len(chunks), width, dtype=torch.int32)
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        total = c.num_computed + n
        if -(-total // block_size) > len(c.block_table):
            raise BrazeError(f"sequence {s} needs {-(-total // block_size)} cache blocks for "
                             f"{total} tokens but has {len(c.block_table)}")
        if len(c.block_table) > width:
            raise BrazeError(f"sequence {s} has {len(c.block_table)} blocks; the block table "
                             f"holds {width} (max_model_len / block_size)")
        for i in range(n):
            p = c.num_computed + i
            positions.append(p)
            slots.append(c.block_table[p // block_size] * block_size + p % block_size)
        ids.extend(c.token_ids)
        qsl.append(qsl[-1] + n)
        seq_lens.append(total)
        tables[s, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)
    pad = (pad_to or len(ids)) - len(ids)
    if pad < 0:
        raise BrazeError(f"step has {len(ids)} tokens, more than the padded size {pad_to}")
    ids += [0] * pad
    positions += [0] * pad
    slots += [-1] * pad
    i64 = dict(dtype=torch.int64, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    return {
        "input_ids": torch.tensor(ids, **i64),
        "positions": torch.tensor(positions, **i64),
        "slot_mapping": torch.tensor(slots, **i64),
        "query_start_loc": torch.tensor(qsl, **i32),
        "seq_lens": torch.tensor(seq_lens, **i32),
        "block_tables": tables.to(device),
        "logits_indices": torch.tensor([q - 1 for q in qsl[1:]], **i64),   # R = S here
    }
