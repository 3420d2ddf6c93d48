"""The MTP graph's calls through bucketed static buffers, like the main model's steps.

The `mtp` proposers (runtime/mtp_proposer.py, runtime/assistant_proposer.py) call their
graph two ways: catch-up calls, a varlen chunk of positions per sequence, and chained
calls, one row per sequence still guessing. Both are steps of the batch contract plus one
per-token input (the hidden state the layer reads), so the main model's GraphRunner runs
them: the MTP graph's launch plan is bound once per bucket of the main runner's bucket
list to static buffers of its own (a chained call of s rows lands in the decode-sized
bucket of s tokens, a catch-up call in the token bucket that holds it), captured into
CUDA graphs on `cuda` (piecewise at the MTP graph's own break ops, as the main graph is
cut) and replayed from the static buffers on `interpret` with the same discipline.

A call larger than the largest bucket (a catch-up over many sequences, or one sequence's
long prompt plus the position before it) is cut into calls that fit, in token order; a
sequence cut in two sees its first part's KV as context in the second, as chunked
prefill does.
"""

from __future__ import annotations

import torch

from braze.ir.contract import group_of_step_input
from braze.ir.errors import BrazeError
from braze.ir.types import torch_dtype

from .graph_runner import GraphRunner
from .input_batch import static_buffers
from .uploads import upload_values


class _MTPExecutor:
    """What GraphRunner reads of an executor, for the MTP graph: its graph, its launch
    plan, the KV cache it binds (its own latent cache, or the target's for an assistant),
    the backend and the device."""

    def __init__(self, main, graph, plan, cache):
        self.backend, self.device = main.backend, main.device
        self.graph, self.plan, self.cache = graph, plan, cache
        self.lora_pools = {}
        self.group_inputs = [v.name for v in graph.inputs if group_of_step_input(v.name)]


class MTPGraphs:
    """Call it like a launch plan's `run(feeds)`: the unpadded step (batch-contract names,
    the hidden input) -> {"logits": one row per logits_indices entry (every token's on an
    unpruned graph), "hidden_states": every token's}, copies the next call cannot touch.
    The cache tensors in `feeds` are ignored: the bucket plans are bound to `cache`."""

    def __init__(self, main, root, graph, plan, cache, hidden_input: str):
        ex = main.executor
        self.hidden_input = hidden_input
        self.plan = plan
        T, S = main.max_num_tokens, main.max_num_seqs
        static = static_buffers(T, S, ex.max_blocks, ex.device)
        hv = next((v for v in graph.inputs if v.name == hidden_input), None)
        if hv is None:
            raise BrazeError(f"artifact {root}: the MTP graph has no input "
                             f"{hidden_input!r} for the target's hidden states; recompile it")
        static[hidden_input] = torch.zeros(hv.type.concrete_shape({"T": T}),
                                           dtype=torch_dtype(hv.type.dtype), device=ex.device)
        g = main.graphs
        self.runner = GraphRunner(_MTPExecutor(ex, graph, plan, cache), static, g.buckets, S,
                                  mode=g.mode, debug=g.debug, token_inputs=(hidden_input,))
        self.pruned = str(graph.outputs["logits"].type.shape[0]) == "R"
        self.runner.capture()

    @property
    def stats(self) -> dict:
        return self.runner.stats

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        r = self.runner
        n, s = int(feeds["input_ids"].shape[0]), int(feeds["seq_lens"].shape[0])
        if n <= r.max_num_tokens and s <= r.max_num_seqs:
            return self._one(feeds)
        return self._cut(feeds)

    def _one(self, feeds: dict) -> dict[str, torch.Tensor]:
        r = self.runner
        n, s = r.write_step(feeds)
        logits = r.run(n, s, decode_only=n == s)
        rows = int(feeds["logits_indices"].shape[0]) if self.pruned else n
        out = {k: v[:n].clone() for k, v in r.last_outputs.items() if k != "logits"}
        out["logits"] = logits[:rows].clone()
        return out

    def _pieces(self, qsl: list[int]) -> list[list[tuple[int, int, int]]]:
        """The sequences of a call (query_start_loc `qsl`) cut into calls that fit the
        largest bucket: each a list of (sequence, first token, end token)."""
        T, S = self.runner.max_num_tokens, self.runner.max_num_seqs
        pieces, cur, used = [], [], 0
        for i in range(len(qsl) - 1):
            a, b = qsl[i], qsl[i + 1]
            while True:
                if len(cur) == S or (used == T and b > a):
                    pieces.append(cur)
                    cur, used = [], 0
                m = min(b - a, T - used)
                cur.append((i, a, a + m))
                used += m
                a += m
                if a == b:
                    break
        if cur:
            pieces.append(cur)
        return pieces

    def _cut(self, feeds: dict) -> dict[str, torch.Tensor]:
        dev = self.runner.static["input_ids"].device
        qsl = feeds["query_start_loc"].tolist()
        seq_lens = feeds["seq_lens"].tolist()
        rows = feeds["logits_indices"].tolist()
        token_rows = [k for k, v in feeds.items() if k in self.runner.static and
                      k not in ("query_start_loc", "logits_indices") and
                      v.shape[0] == qsl[-1] and not k.startswith(("seq_lens", "block_tables"))]
        seq_rows = [k for k in feeds if k in self.runner.static and
                    k.startswith(("seq_lens", "block_tables"))]
        hidden, logits = [], [None] * len(rows)
        for piece in self._pieces(qsl):
            tok = upload_values([t for _, a, b in piece for t in range(a, b)], torch.int64, dev)
            seq = upload_values([i for i, _, _ in piece], torch.int64, dev)
            sub = {k: feeds[k].index_select(0, tok) for k in token_rows}
            sub.update((k, feeds[k].index_select(0, seq)) for k in seq_rows)
            # a sequence cut short here sees as context only the tokens up to its cut
            sub["seq_lens"] = upload_values([seq_lens[i] - (qsl[i + 1] - b) for i, _, b in piece],
                                            feeds["seq_lens"].dtype, dev)
            starts, local = [0], {}
            for i, a, b in piece:
                for t in range(a, b):
                    local[t] = starts[-1] + t - a
                starts.append(starts[-1] + b - a)
            sub["query_start_loc"] = upload_values(starts, feeds["query_start_loc"].dtype, dev)
            mine = [j for j, t in enumerate(rows) if t in local]
            sub["logits_indices"] = upload_values([local[rows[j]] for j in mine], torch.int64,
                                                  dev)
            out = self._one(sub)
            hidden.append(out["hidden_states"])
            if self.pruned:
                for j, row in zip(mine, out["logits"]):
                    logits[j] = row
            else:
                logits.append(out["logits"])
        if self.pruned:
            logits = torch.stack(logits)
        else:
            logits = torch.cat([x for x in logits if x is not None])
        return {"logits": logits, "hidden_states": torch.cat(hidden)}
