"""The `mtp` proposer for Gemma 4: its assistant model (`Gemma4AssistantForCausalLM`)
guesses the next tokens from the target's last hidden state and KV cache.

The artifact's second graph (`mtp.bir`, kind "gemma4_assistant", compiled by
braze/compile_mtp.py `prepare_assistant` from `--mtp-assistant DIR`) runs the assistant
(models/gemma4_assistant.py): at position q = L - 1 (L the request's token count; the
last token's KV is not computed yet) it reads the token t_q, the target's final hidden
state at q - 1 and the target's KV cache of positions < q, and gives logits for the token
at q + 1 plus h', its own projection of the state. Guess j + 1 chains on guess j: the
same position and keys, token d_j and h'. The assistant writes no KV, so it needs no
cache, rollback or preemption bookkeeping of its own: the target's cache after a
verified step (rejected guesses rolled back: runtime/speculative.py) is what it reads,
masked to positions < q by seq_lens.

Per request it keeps the target's hidden states of the latest step's positions
(`observe`): the row of position L - 2 is the last accepted one after a drafted step
(earlier rows are dropped), or the prompt's last. transformers passes its assistant
those same rows (the last prompt position, then the last accepted).

The guesses are greedy (a point-mass proposal), so the verification keeps greedy output
identical and sampled output distributed as the target's. The assistant runs its own
launch plan's Triton kernels with backend `interpret` or `cuda`, bound per bucket to static
buffers and captured into CUDA graphs on `cuda` (mtp_proposer.mtp_runner,
runtime/mtp_graphs.py), else the reference interpreter. On a tensor-parallel artifact it
is sharded like the target (its query heads as the target's KV heads), runs on rank 0,
and each call reaches the other ranks, which run it on their part of the target's cache
(runtime/parallel.py `distribute_mtp`); there its launches run eagerly, not captured.
"""

from __future__ import annotations

import torch

from braze.ir.contract import group_of_step_input
from braze.ir.errors import BrazeError

from . import parallel
from .mtp_proposer import load_mtp, mtp_runner
from .speculative import could_speculate
from .uploads import upload_values

KIND = "gemma4_assistant"


class AssistantProposer:
    def __init__(self, config, engine):
        runner = engine.runner
        ex = runner.executor
        self.graph, self.params, self.hidden_input = load_mtp(engine.artifact, ex.params,
                                                              ex.device)
        if ex.graph.outputs.get("hidden_states") is None:
            raise BrazeError(f"artifact {engine.artifact.root}: the target graph has no "
                             f"hidden_states output for its assistant; recompile with "
                             f"--mtp-assistant", param="speculative")
        self.engine = engine
        self.runner = runner
        self.device = ex.device
        self.k = config.num_speculative_tokens
        self.vocab = engine.vocab_size
        self.cache = ex.cache               # the target's: read, never written
        self.run_graph, self.runs_on = mtp_runner(
            engine.artifact, ex, self.graph, self.params,
            None if parallel.current_group() else (runner, self.cache, self.hidden_input))
        self.cache_names = [n for n in ex.cache.tensors
                            if n in {v.name for v in self.graph.inputs}]
        # a tensor-parallel artifact: every call first reaches the other ranks, which run
        # it on their shards and their part of the target's cache (runtime/parallel.py)
        self.run_graph = parallel.distribute_mtp(
            self.run_graph, self.graph, {n: ex.cache.tensors[n] for n in self.cache_names})
        self.groups = sorted(g for _, g in filter(None, (group_of_step_input(v.name)
                                                          for v in self.graph.inputs)))
        self.rows: dict[str, tuple[int, torch.Tensor]] = {}   # id -> (first position, h rows)
        self.num_mtp_calls = 0

    def observe(self, chunks) -> None:
        """Keep each speculating request's hidden states of the step just launched (the
        last k + 1 rows of its chunk: all a drafted step has, a prompt chunk's last)."""
        outs = getattr(self.runner.graphs, "last_outputs", None)
        hidden = None if outs is None else outs.get("hidden_states")
        if hidden is None:
            return
        off = 0
        for c in chunks:
            n, req = c.num_new, c.request
            if could_speculate(req):
                keep = min(n, self.k + 1)
                self.rows[req.request_id] = (c.start + n - keep,
                                             hidden[off + n - keep:off + n].clone())
            off += n

    def forget(self, req) -> None:
        self.rows.pop(req.request_id, None)

    def _tables(self, rid) -> dict[str, list[int]]:
        bm = self.engine.block_manager
        hybrid = getattr(bm, "num_groups", 1) > 1
        out = {"block_tables": list(bm.block_table(rid, 0) if hybrid else bm.block_table(rid))}
        for g in self.groups:
            out[f"block_tables.g{g}"] = (list(bm.block_table(rid, g)) if hybrid
                                         else out["block_tables"])
        return out

    def _table_tensors(self, tables: list[dict]) -> dict[str, torch.Tensor]:
        """The block tables of the sequences a proposal starts with, one padded row each
        (built once: the chained calls select the rows still guessing)."""
        out = {}
        for name in tables[0]:
            width = max(len(t[name]) for t in tables)
            out[name] = upload_values([t[name] + [0] * (width - len(t[name])) for t in tables],
                                      torch.int32, self.device)
        return out

    def _run(self, tokens, positions, hidden, tables: dict[str, torch.Tensor]):
        """One assistant call, one query row per sequence (`tables`: their block-table
        rows): -> (logits, h')."""
        dev, S = self.device, len(tokens)
        feeds = {
            "input_ids": upload_values(tokens, torch.int64, dev),
            "positions": upload_values(positions, torch.int64, dev),
            "slot_mapping": torch.full((S,), -1, dtype=torch.int64, device=dev),
            "query_start_loc": torch.arange(S + 1, dtype=torch.int32, device=dev),
            # the query attends at position q - 1: the target's keys 0 .. q - 1
            "seq_lens": upload_values(positions, torch.int32, dev),
            "logits_indices": torch.arange(S, dtype=torch.int64, device=dev),
            self.hidden_input: hidden,
        }
        feeds.update(tables)
        feeds.update((n, self.cache.tensors[n]) for n in self.cache_names)
        out = self.run_graph(feeds)
        self.num_mtp_calls += 1
        return out["logits"], out["hidden_states"]

    def propose(self, reqs: list, budgets: list[int]) -> list[list[int]]:
        bm = self.engine.block_manager
        out = [[] for _ in reqs]
        live = []                      # (index, budget, token, position, h row, table row)
        tables = []
        for i, (r, b) in enumerate(zip(reqs, budgets)):
            kept = self.rows.get(r.request_id)
            L = len(r.all_token_ids)
            if kept is None or r.request_id not in bm or L < 2:
                continue
            first, rows = kept
            if not first <= L - 2 < first + len(rows):
                continue
            live.append((i, b, r.all_token_ids[-1], L - 1, rows[L - 2 - first:L - 1 - first],
                         len(tables)))
            tables.append(self._tables(r.request_id))
        all_tables = self._table_tensors(tables) if live else {}
        while live:
            at = upload_values([x[5] for x in live], torch.int64, self.device)
            logits, h = self._run([x[2] for x in live], [x[3] for x in live],
                                  torch.cat([x[4] for x in live]),
                                  {n: t.index_select(0, at) for n, t in all_tables.items()})
            nxt = []
            for j, (x, g) in enumerate(zip(live, logits.argmax(dim=-1).tolist())):
                i, b, _, q, _, row = x
                if self.vocab and g >= self.vocab:      # a padded vocabulary's id: stop
                    continue
                out[i].append(g)
                if len(out[i]) < b:
                    nxt.append((i, b, g, q, h[j:j + 1], row))
            live = nxt
        return out
