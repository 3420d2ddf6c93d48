"""The persistent batch: request state in fixed rows of device tensors.

A running request owns a row. Its tokens (prompt, then every sampled token) live in
`token_ids[row]`, its KV block table in `block_table[row]`, its sampling settings in
per-row vectors. The host writes a row when a request is (re)admitted and then only
deltas: block-table entries it has not sent yet, and each step's row mapping
(row, new tokens, first position, whether it samples) as one small tensor. Every
step input of the batch contract (ir/contract.py) is then computed on the device
from that state and written into the static buffers the executor (and its CUDA
graphs) read. Sampled tokens are written into `token_ids` on the device, so the
next step's `input_ids` never make a round trip through the host.
"""

from __future__ import annotations

import numpy as np
import torch

from braze.ir.contract import STEP_INPUTS
from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype

from .graph_runner import PADDING, group_inputs, pad_step
from .request import Request
from .sampler import Logprobs, SamplingTensors, compute_logprobs
from .scheduler import ScheduledChunk
from .uploads import upload, upload_values

I64, I32 = torch.int64, torch.int32

def static_buffers(max_num_tokens: int, max_num_seqs: int, max_blocks: int, device,
                   max_logits_rows: int | None = None) -> dict:
    """The persistent step-input buffers of the batch contract, sized for the largest step
    and filled with padding; never reallocated. `max_logits_rows` (R, default one per
    sequence) sizes `logits_indices`."""
    rows = max_num_seqs if max_logits_rows is None else max(max_logits_rows, max_num_seqs)
    sizes = {"T": max_num_tokens, "S": max_num_seqs, "MB": max_blocks,
             "R": min(rows, max_num_tokens)}
    return {name: torch.full(t.concrete_shape(sizes), PADDING.get(name, 0),
                             dtype=torch_dtype(t.dtype), device=device)
            for name, t in STEP_INPUTS.items()}


def _host_i64(columns: list[list]) -> torch.Tensor:
    """Equal-length Python int lists as one int64 host tensor, a row each. Through numpy:
    torch.tensor() reads a list of 4 x 256 ints in about 60 us on a CPU, numpy in 15."""
    return torch.from_numpy(np.array(columns, dtype=np.int64))


class PersistentBatch:
    def __init__(self, max_num_seqs: int, max_len: int, max_blocks: int, block_size: int,
                 device, static: dict[str, torch.Tensor]):
        z = dict(device=device)
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_len = max_len
        self.static = static
        # +1 column: a request at max_len still gets its last sampled token written
        self.token_ids = torch.zeros(max_num_seqs, max_len + 1, dtype=I64, **z)
        self.block_table = torch.zeros(max_num_seqs, max_blocks, dtype=I32, **z)
        self.prompt_len = torch.zeros(max_num_seqs, dtype=I64, **z)
        self.sampling = SamplingTensors(max_num_seqs, device)
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._blocks_sent = [0] * max_num_seqs       # host mirror of each row's table length
        self._arange = torch.arange(max(max_num_seqs, static["input_ids"].shape[0]) + 1,
                                    dtype=I64, **z)
        self._pending_tokens: list[tuple[int, list[int]]] = []
        # (row, (prompt len, params, seed, bias entries, multi-token bad words))
        self._pending_params: list[tuple[int, tuple]] = []
        # LoRA: each row's adapter slot (-1 none), when the artifact has the lora_slots input
        self.lora = "lora_slots" in static
        self.lora_slot = torch.full((max_num_seqs,), -1, dtype=I32, **z) if self.lora else None
        self._pending_lora: list[tuple[int, int]] = []
        # a hybrid cache's KV cache groups g >= 1 (runtime/hybrid_cache.py): their block
        # tables, each sent like the main one; with a plain block manager (window freeing
        # off) every group reads the main table
        self.num_groups = 1 + sum(n.startswith("block_tables.") for n in group_inputs(static))
        self.group_tables = [torch.zeros(max_num_seqs, max_blocks, dtype=I32, **z)
                             for _ in range(self.num_groups - 1)]
        self._group_sent = [[0] * max_num_seqs for _ in range(self.num_groups - 1)]
        # a KernelPrepare (one launch instead of ~20 ops a step), set by the model runner
        self.prepare_kernel: KernelPrepare | None = None

    # ---------------------------------------------------------------- rows

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def add(self, req: Request, seed: int, bias: list | None = None,
            bad_sequences: list | None = None) -> None:
        """Give a (re)admitted request a row; its tokens and settings go to the device with
        the next step's deltas."""
        if req.row is not None:
            raise BrazeError(f"request {req.request_id!r} already has row {req.row}")
        if not self._free_rows:
            raise BrazeError("persistent batch is full: more running requests than max_num_seqs")
        row = self._free_rows.pop()
        req.row = row
        self._blocks_sent[row] = 0
        for sent in self._group_sent:
            sent[row] = 0
        self._pending_tokens.append((row, req.all_token_ids))
        if self.lora:
            self._pending_lora.append((row, -1 if req.lora_slot is None else req.lora_slot))
        self._pending_params.append((row, (len(req.prompt_token_ids), req.params, seed,
                                           bias if bias is not None else [],
                                           bad_sequences if bad_sequences is not None else [])))

    def remove(self, req: Request) -> None:
        if req.row is not None:
            self._free_rows.append(req.row)
            self.sampling.release(req.row)
            self._pending_tokens = [(r, t) for r, t in self._pending_tokens if r != req.row]
            self._pending_params = [(r, v) for r, v in self._pending_params if r != req.row]
            self._pending_lora = [(r, v) for r, v in self._pending_lora if r != req.row]
            req.row = None

    def rollback_blocks(self, row: int, table_len: int) -> None:
        """The row's sequence now holds `table_len` blocks (speculative slots given back):
        entries past them are sent again once the sequence has new blocks there."""
        self._blocks_sent[row] = min(self._blocks_sent[row], table_len)
        for sent in self._group_sent:
            sent[row] = min(sent[row], table_len)

    # ---------------------------------------------------------------- deltas

    def _send_deltas(self, chunks: list[ScheduledChunk], block_manager) -> None:
        rows, cols, vals = [], [], []
        for r, tokens in self._pending_tokens:
            n = len(tokens)
            rows.extend([r] * n)
            cols.extend(range(n))
            vals.extend(tokens)
        if rows:
            self._put(self.token_ids, rows, cols, vals)
        self._pending_tokens.clear()
        if self._pending_params:
            rows = [r for r, _ in self._pending_params]
            prompt_lens, params, seeds, bias, seqs = zip(*[v for _, v in self._pending_params])
            idx = upload_values(rows, I64, self.device)
            self.prompt_len[idx] = upload_values(prompt_lens, I64, self.device)
            self.sampling.set_rows(rows, params, seeds, bias, seqs)
            self._pending_params.clear()
        if self._pending_lora:
            rows, vals = zip(*self._pending_lora)
            self._put(self.lora_slot[None], [0] * len(rows), list(rows), list(vals))
            self._pending_lora.clear()
        rows, cols, vals = [], [], []
        bs, sent_of = self.block_size, self._blocks_sent
        for c in chunks:
            r = c.request.row
            sent = sent_of[r]
            if (c.start + c.num_new + bs - 1) // bs > sent:   # the step reaches an unsent block
                new = block_manager.table_since(c.request.request_id, sent)
                rows.extend([r] * len(new))
                cols.extend(range(sent, sent + len(new)))
                vals.extend(new)
                self._blocks_sent[r] = sent + len(new)
        if rows:
            self._put(self.block_table, rows, cols, vals)
        if self.group_tables and getattr(block_manager, "num_groups", 1) > 1:
            for g, (table, sent_of) in enumerate(zip(self.group_tables, self._group_sent), 1):
                rows, cols, vals = [], [], []
                for c in chunks:
                    r = c.request.row
                    sent = sent_of[r]
                    if (c.start + c.num_new + bs - 1) // bs > sent:
                        new = block_manager.table_since(c.request.request_id, sent, g)
                        rows.extend([r] * len(new))
                        cols.extend(range(sent, sent + len(new)))
                        vals.extend(new)
                        sent_of[r] = sent + len(new)
                if rows:
                    self._put(table, rows, cols, vals)

    def send_tables(self, chunks: list[ScheduledChunk], block_manager) -> None:
        """Send what the device lacks for these chunks now (new rows' tokens and settings,
        the block-table entries they reach): for several steps prepared once on the device
        (runtime/decode_loop.py), the chunks as far as the last step goes."""
        self._send_deltas(chunks, block_manager)

    def _group_inputs(self, block_manager, r, pos, rows, T: int, S: int) -> None:
        """Each KV cache group's slot mapping and block tables (group g >= 1)."""
        hybrid = getattr(block_manager, "num_groups", 1) > 1
        bs, st = self.block_size, self.static
        for g in range(1, self.num_groups):
            table = self.group_tables[g - 1] if hybrid else self.block_table
            st[f"slot_mapping.g{g}"][:T] = table[r, pos // bs].to(I64) * bs + pos % bs
            st[f"block_tables.g{g}"][:S] = table[rows]

    def _put(self, target: torch.Tensor, rows, cols, vals) -> None:
        d = upload(_host_i64([rows, cols, vals]), self.device)
        target.index_put_((d[0], d[1]), d[2].to(target.dtype))

    # ---------------------------------------------------------------- a step

    def prepare(self, chunks: list[ScheduledChunk], block_manager, num_tokens_padded: int,
                num_seqs_padded: int, rows_padded: int | None = None,
                drafted: bool = False) -> dict[str, torch.Tensor]:
        """Write this step's inputs into the static buffers (padded to the bucket); returns
        the per-logits-row vectors the sampler needs (rows, seq_lens, samples). A step
        with speculative tokens (`drafted`) has 1 + num_draft logits rows per chunk."""
        self._send_deltas(chunks, block_manager)
        if drafted:
            return self._prepare_drafted(chunks, num_tokens_padded, num_seqs_padded,
                                         rows_padded, block_manager)
        num_new = [c.num_new for c in chunks]
        samples = [c.samples for c in chunks]
        S, T = len(chunks), sum(num_new)
        every = all(samples)
        if self.prepare_kernel is not None and self.num_groups == 1:
            return self._prepare_fused(chunks, num_new, samples, every, num_tokens_padded,
                                       num_seqs_padded, rows_padded)
        meta = upload(_host_i64([[c.request.row for c in chunks], num_new,
                                 [c.start for c in chunks], samples]), self.device)
        rows, num_new, start, samples = meta[0], meta[1], meta[2], meta[3]
        if T == S:          # one token per sequence (decode): token i is sequence i's
            ends, r, pos = self._arange[1:S + 1], rows, start
        else:
            ends = torch.cumsum(num_new, 0)
            seq_of = torch.repeat_interleave(self._arange[:S], num_new, output_size=T)
            pos = start[seq_of] + self._arange[:T] - (ends - num_new)[seq_of]
            r = rows[seq_of]
        st = self.static
        st["input_ids"][:T] = self.token_ids[r, pos]
        st["positions"][:T] = pos
        bs = self.block_size
        st["slot_mapping"][:T] = self.block_table[r, pos // bs].to(I64) * bs + pos % bs
        seq_lens = start + num_new
        st["query_start_loc"][1:S + 1] = ends
        st["seq_lens"][:S] = seq_lens
        st["block_tables"][:S] = self.block_table[rows]
        st["logits_indices"][:S] = ends - 1
        if self.num_groups > 1:
            self._group_inputs(block_manager, r, pos, rows, T, S)
        if self.lora:
            st["lora_slots"][:T] = self.lora_slot[r]
        pad_step(st, T, S, num_tokens_padded, num_seqs_padded, S,
                 rows_padded or num_seqs_padded)   # query_start_loc[0] stays 0
        return {"rows": rows, "seq_lens": seq_lens, "samples": None if every else samples}

    def _prepare_fused(self, chunks: list[ScheduledChunk], num_new: list[int],
                       samples: list[bool], every: bool, Tp: int, Sp: int,
                       Rp: int | None) -> dict[str, torch.Tensor]:
        """`prepare` as one upload and one kernel launch (runtime/prepare_kernel.py): the
        host already holds each chunk's token count, so the running sums and the sequence
        lengths travel with the rows instead of being computed on the device."""
        starts = [c.start for c in chunks]
        ends = np.cumsum(num_new).tolist()
        meta = upload(_host_i64([[c.request.row for c in chunks], num_new, starts, ends,
                                 [a + b for a, b in zip(starts, num_new)], samples]),
                      self.device)
        self.prepare_kernel(self, meta, len(chunks), Sp, ends[-1] if ends else 0, Tp,
                            Rp or Sp)
        return {"rows": meta[0], "seq_lens": meta[4], "samples": None if every else meta[5]}

    def _prepare_drafted(self, chunks: list[ScheduledChunk], Tp: int, Sp: int,
                         Rp: int, block_manager=None) -> dict[str, torch.Tensor]:
        """A verification step: each chunk's proposals go into its row of `token_ids` after
        its last token, and every position from that token on gets a logits row (the
        target's choice after each prefix of the proposals)."""
        rows, cols, vals = [], [], []
        for c in chunks:
            if c.num_draft:
                real = c.start + c.num_new - c.num_draft
                rows.extend([c.request.row] * c.num_draft)
                cols.extend(range(real, real + c.num_draft))
                vals.extend(c.request.draft_token_ids[:c.num_draft])
        self._put(self.token_ids, rows, cols, vals)
        num_new = [c.num_new for c in chunks]
        nrows = [1 + c.num_draft for c in chunks]
        S, T, R = len(chunks), sum(num_new), sum(nrows)
        meta = upload(_host_i64([[c.request.row for c in chunks], num_new,
                                 [c.start for c in chunks], [c.samples for c in chunks],
                                 nrows]), self.device)
        rows, num_new, start, samples, nrows = meta[0], meta[1], meta[2], meta[3], meta[4]
        ends = torch.cumsum(num_new, 0)
        seq_of = torch.repeat_interleave(self._arange[:S], num_new, output_size=T)
        pos = start[seq_of] + self._arange[:T] - (ends - num_new)[seq_of]
        r = rows[seq_of]
        st = self.static
        st["input_ids"][:T] = self.token_ids[r, pos]
        st["positions"][:T] = pos
        bs = self.block_size
        st["slot_mapping"][:T] = self.block_table[r, pos // bs].to(I64) * bs + pos % bs
        st["query_start_loc"][1:S + 1] = ends
        st["seq_lens"][:S] = start + num_new
        st["block_tables"][:S] = self.block_table[rows]
        if self.num_groups > 1:
            self._group_inputs(block_manager, r, pos, rows, T, S)
        row_ends = torch.cumsum(nrows, 0)
        chunk_of = torch.repeat_interleave(self._arange[:S], nrows, output_size=R)
        index = (ends - nrows)[chunk_of] + self._arange[:R] - (row_ends - nrows)[chunk_of]
        st["logits_indices"][:R] = index
        if self.lora:
            st["lora_slots"][:T] = self.lora_slot[r]
        pad_step(st, T, S, Tp, Sp, R, Rp)
        # each logits row draws the token after its position: the sequence then holds pos + 1
        return {"rows": rows[chunk_of], "seq_lens": pos[index] + 1,
                "samples": samples[chunk_of], "num_rows": R}

    def write_sampled(self, rows: torch.Tensor, seq_lens: torch.Tensor,
                      samples: torch.Tensor | None, tokens: torch.Tensor) -> None:
        """Append each sampling row's token to its row of `token_ids`, on the device
        (`samples` None: every row samples)."""
        col = seq_lens.clamp(max=self.max_len)
        if samples is not None:
            tokens = torch.where(samples.bool(), tokens, self.token_ids[rows, col])
        self.token_ids[rows, col] = tokens

    def sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk], rows: torch.Tensor,
               seq_lens: torch.Tensor) -> tuple[torch.Tensor, Logprobs | None]:
        """Each sequence's next token, and the raw logprobs when a row reports them. Its
        counter (the output index being drawn) is derived from the sequence: tokens after
        this step less the prompt. Penalties read the rows' token histories here, on the
        device (with async scheduling the last sampled token is already there)."""
        s = self.sampling
        if not s.any_sampling and not s.any_optioned:      # the plain greedy step
            return s.sample(logits, rows, None, greedy_only=True), None
        host_rows = [c.request.row for c in chunks]
        options = s.any_options(host_rows)
        bias = options and s.needs_bias(host_rows)
        penalties = options and s.needs_penalties(host_rows)
        greedy = s.all_greedy(host_rows)
        counters = None
        if bias or penalties or not greedy:
            counters = seq_lens.to(I64) - self.prompt_len[rows]
        tokens = None
        if penalties:     # the histories up to the longest sequence of the step
            width = max(c.start + c.num_new for c in chunks)
            tokens = self.token_ids[rows, :width]
        tail = None
        if options and s.needs_bad_words(host_rows):   # the last P output tokens, right-aligned
            P = s.bad_word_prefix_len
            n = seq_lens.to(I64)
            pos = n[:, None] - P + torch.arange(P, device=self.device)[None, :]
            prompt_len = self.prompt_len[rows]
            tail = torch.where(pos >= prompt_len[:, None],
                               self.token_ids[rows[:, None], pos.clamp(min=0)], -2)
        proc = s.processing(rows, bias=bias, penalties=penalties,
                            allowed=bias and s.needs_allowed(host_rows), tokens=tokens,
                            prompt_len=self.prompt_len[rows] if penalties else None,
                            seq_len=seq_lens.to(I64) if penalties else None, tail=tail)
        if greedy:
            out = s.sample(logits, rows, counters, greedy_only=True, proc=proc)
        else:
            out = s.sample(logits.float(), rows, counters, filter=s.needs_filter(host_rows),
                           proc=proc)
        k = s.num_logprobs(host_rows) if options else -1
        return out, (compute_logprobs(logits, out, k) if k >= 0 else None)


class KernelPrepare:
    """`PersistentBatch.prepare` for a step without speculative tokens or extra KV cache
    groups as one Triton launch (runtime/prepare_kernel.py): JIT-compiled on the GPU (at
    construction, on an empty step), under the interpreter on the CPU."""

    BLOCK = 128

    def __init__(self, batch: PersistentBatch, interpret: bool):
        from pathlib import Path

        from braze.kernel_modules import load_source
        path = Path(__file__).with_name("prepare_kernel.py")
        mod = load_source("prepare_kernel", path.read_text(), str(path), interpret)
        self.kernel = mod.prepare_step_kernel
        self.launches = 0
        st = batch.static
        self.lora_out = st["lora_slots"] if batch.lora else st["input_ids"]
        self.lora_in = batch.lora_slot if batch.lora else batch.block_table
        self(batch, torch.zeros(5, 1, dtype=I64, device=batch.device), 0, 0, 0, 0, 0)
        self.launches = 0

    def __call__(self, batch: PersistentBatch, meta: torch.Tensor, S: int, Sp: int, T: int,
                 Tp: int, Rp: int) -> None:
        st = batch.static
        self.kernel[(Sp + 1,)](
            meta, S, Sp, T, Tp, Rp, batch.token_ids, batch.token_ids.stride(0),
            batch.block_table, batch.block_table.stride(0), self.lora_in,
            st["input_ids"], st["positions"], st["slot_mapping"], st["query_start_loc"],
            st["seq_lens"], st["block_tables"], st["block_tables"].stride(0),
            st["logits_indices"], self.lora_out, st["block_tables"].shape[1],
            BS=batch.block_size, BLOCK=self.BLOCK, HAS_LORA=batch.lora)
        self.launches += 1
