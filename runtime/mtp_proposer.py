"""The `mtp` proposer: DeepSeek-V3's multi-token-prediction layer guesses the next tokens.

The artifact's second graph (`mtp.bir`, compiled by braze/compile_mtp.py from the
checkpoint's `num_nextn_predict_layers` weights) runs one MTP layer: at position t it
reads the main model's hidden state h_t (its last layer, before the final norm) and
the token t+1, and gives logits for token t+2 plus its own hidden state. It shares
the main graph's embedding and LM head (the same tensors) and has its own latent KV
cache, indexed by the main sequence's block table (same blocks, same slots), so the
block manager's allocation, rollback and preemption cover it without more bookkeeping.

Flow per request (state `_MTPState`):
  - after every main step (`observe`), the hidden states of the positions the step
    computed are kept (rows of the main graph's `hidden_states` output); a drafted
    step's rows past the accepted guesses are dropped at the next observe, which starts
    at the first position not accepted;
  - the MTP layer computes its KV for every position t whose h_t and token t+1 are
    known and that it has not computed yet: right after a prompt chunk (all but its last
    position know their next token; so a long prompt's rows are never all held), and
    before a step (`propose`) up to L-2 (L the request's token count): one varlen call
    for all requests; the last row's greedy token is the first guess d_1;
  - guesses 2..k chain the layer on itself: position L-1 with token d_1 and, in place
    of the main model's h (not known yet), the MTP layer's own output hidden state.
    Those positions' MTP KV is written where the rows' blocks will be (or a scratch
    block past the main cache's) and rewritten from the real h once it is known.
The guesses are greedy (a point-mass proposal), so the verification in
runtime/speculative.py keeps greedy output identical and sampled output distributed
as the target's.

Rollback: a rejected guess's position is past the accepted prefix; the next observe
starts there, so `done` never passes a position whose MTP KV came from a rejected token
or from the layer's own hidden state. A preempted request recomputes from its start:
`done` follows it back. With prefix caching, positions whose blocks came from the cache
were never computed by this request's main steps, so it has no h for them: the MTP
reads what the request that filled those blocks wrote there (only the guesses depend
on it, never the output).

The MTP graph has a launch plan of its own (built at compile time like the main
graph's, from the same kernel templates; its cubins in mtp-cubin/): with backend
`interpret` or `cuda` it runs those Triton kernels (`runs_on` "plan") through bucketed
static buffers, bound once per bucket and on `cuda` captured into CUDA graphs like the
main model's steps (runtime/mtp_graphs.py); with `reference`, or an artifact compiled
before it had one, the reference interpreter.

Tensor parallelism: the MTP graph is sharded like the main graph (each rank its own MTP
weight files); this proposer runs on rank 0 only, and each call of the graph first hands
its inputs to the other ranks, which run it too (runtime/parallel.py `distribute_mtp`).
Then the calls run the plan eagerly on every rank, not through captured buckets: a
capture on rank 0 would run collectives the other ranks never meet.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load_file

from braze.artifact import changed
from braze.ir import parse_graph, verify
from braze.ir.interpreter import Interpreter
from braze.ir.errors import BrazeError

from . import parallel
from .kv_cache import KVCache
from .speculative import could_speculate
from .uploads import upload_values

NO_MTP_GRAPH = (
    "speculative method 'mtp' needs the artifact's multi-token-prediction graph, and "
    "{root} has none: compile a checkpoint with DeepSeek-V3's next-n layer weights "
    "(config.json num_nextn_predict_layers >= 1, tensors model.layers.<num_hidden_layers>.*) "
    "with this braze; or use method 'ngram' (prompt lookup) or 'draft' (a second braze "
    "artifact)")
GEMMA4_ASSISTANT = (
    "speculative method 'mtp' for Gemma 4 needs its assistant model "
    "(Gemma4AssistantForCausalLM) compiled into the artifact, and {root} has none: compile "
    "with `braze compile TARGET -o OUT --mtp-assistant ASSISTANT_DIR`; or use 'ngram' or 'draft'")


def load_mtp(artifact, main_params: dict, device):
    """(graph, params) of the artifact's MTP layer; shared params are the main graph's tensors."""
    m = artifact.manifest.get("mtp") or {}
    if "graph" not in m:
        if artifact.model.get("family") == "gemma4":
            raise BrazeError(GEMMA4_ASSISTANT.format(root=artifact.root), param="speculative")
        raise BrazeError(NO_MTP_GRAPH.format(root=artifact.root), param="speculative")
    root = artifact.root
    data = (root / m["graph"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != artifact.manifest["files"].get(m["graph"]):
        raise BrazeError(changed(root, m["graph"]))
    try:
        graph = parse_graph(data.decode("utf-8"), source=m["graph"])
        verify(graph)
    except (BrazeError, UnicodeDecodeError) as e:
        raise BrazeError(f"artifact {root}: {m['graph']} is invalid: {e}") from None
    params = {}
    for f in _rank_files(artifact, m, graph):
        try:
            params.update(load_file(str(root / f), device=str(device)))
        except Exception as e:  # safetensors raises its own error types
            raise BrazeError(f"artifact MTP weights {root / f} cannot be read ({e})") from None
    for name in m.get("shared", []):
        if name not in main_params:
            raise BrazeError(f"artifact {root}: the MTP graph shares {name} with the main "
                             f"graph, which has no such weight; recompile the artifact")
        params[name] = main_params[name]
    for name, p in graph.params.items():
        t = params.get(name)
        if t is None or tuple(t.shape) != tuple(p.type.shape):
            raise BrazeError(f"artifact {root}: MTP weight {name} is missing or not shaped "
                             f"{p.type}; recompile the artifact")
    return graph, params, m.get("hidden_input", "hidden_states")


def _rank_files(artifact, m: dict, graph) -> list[str]:
    """The MTP weight files of this process's tensor-parallel rank (all of them for one
    rank). Rank 0 first checks every other rank's files hold the MTP graph's weights in
    their shapes (headers only), so that a broken shard is refused before any rank runs."""
    if "ranks" not in m:
        return m["files"]
    from .parallel import current_rank, tensor_parallel_size
    ranks, n = m["ranks"], tensor_parallel_size(artifact.manifest)
    if len(ranks) != n:
        raise BrazeError(f"artifact {artifact.root}: its MTP weights are split for {len(ranks)} "
                         f"ranks, its main weights for {n}; recompile the artifact")
    rank = current_rank()
    if rank == 0:
        for r in range(1, n):
            _check_rank_files(artifact, graph, r, ranks[r]["files"])
    return ranks[rank]["files"]


def _check_rank_files(artifact, graph, rank: int, files: list[str]) -> None:
    from safetensors import safe_open
    root = artifact.root
    shapes = {}
    for f in files:
        try:
            with safe_open(str(root / f), "pt") as sf:
                shapes.update((k, tuple(sf.get_slice(k).get_shape())) for k in sf.keys())
        except Exception as e:  # safetensors raises its own error types
            raise BrazeError(f"artifact MTP weights {root / f} (tensor-parallel rank {rank}) "
                             f"cannot be read ({e}); recompile the artifact") from None
    shared = set((artifact.manifest.get("mtp") or {}).get("shared", []))
    for name, p in graph.params.items():
        if name not in shared and shapes.get(name) != tuple(p.type.shape):
            raise BrazeError(f"artifact {root}: MTP weight {name} of tensor-parallel rank "
                             f"{rank} is missing from {', '.join(files)} or not shaped "
                             f"{p.type}; recompile the artifact")


def mtp_runner(artifact, ex, graph, params: dict, bucketed=None):
    """-> (run(feeds) -> the MTP graph's outputs, how it runs): its own launch plan's
    Triton kernels ("plan") when the executor `ex`'s backend runs plans (interpret, cuda)
    and the artifact has one for it, else the reference interpreter ("reference").
    `bucketed` = (the main ModelRunner, the cache the plan binds, the hidden input): the
    plan runs through bucketed static buffers, captured on cuda (runtime/mtp_graphs.py);
    None: eagerly (tensor-parallel ranks, whose every call is exchanged first)."""
    m = artifact.manifest.get("mtp") or {}
    if ex.plan is None or "plan" not in m:
        interp = Interpreter(graph)
        return (lambda feeds: interp.run(feeds, params)), "reference"
    from .mtp_graphs import MTPGraphs
    from .plan_executor import PlanExecutor
    plan = PlanExecutor(artifact, params, ex.device, interpret=ex.backend == "interpret",
                        second=m, graph=graph)
    if bucketed is None:
        return plan.run, "plan"
    main, cache, hidden_input = bucketed
    return MTPGraphs(main, artifact.root, graph, plan, cache, hidden_input), "plan"


class _MTPState:
    __slots__ = ("done", "hid", "hid_start", "last")

    def __init__(self, start: int):
        self.done = start          # positions 0 .. done-1 have their MTP KV
        self.hid = None            # main hidden states of positions hid_start ..
        self.hid_start = start
        self.last = None           # (token count, guesses) of the latest proposal


class MTPProposer:
    def __init__(self, config, engine):
        runner = engine.runner
        ex = runner.executor
        if engine.artifact.model.get("family") == "gemma4":     # load_mtp says what to do
            load_mtp(engine.artifact, ex.params, ex.device)
        if ex.graph.outputs.get("hidden_states") is None:
            raise BrazeError(NO_MTP_GRAPH.format(root=engine.artifact.root),
                             param="speculative")
        self.graph, self.params, self.hidden_input = load_mtp(engine.artifact, ex.params,
                                                              ex.device)
        self.logits_pruned = str(self.graph.outputs["logits"].type.shape[0]) == "R"
        self.engine = engine
        self.runner = runner
        self.device = ex.device
        self.block_size = runner.block_size
        self.k = config.num_speculative_tokens
        # scratch blocks for chained guesses past a row's blocks, one set per batch row
        self.scratch_per_seq = -(-self.k // self.block_size) + 1
        self.scratch_base = runner.num_kv_blocks
        blocks = runner.num_kv_blocks + self.scratch_per_seq * runner.max_num_seqs
        self.cache = KVCache(self.graph, blocks, self.device)
        self.run_graph, self.runs_on = mtp_runner(
            engine.artifact, ex, self.graph, self.params,
            None if parallel.current_group() else (runner, self.cache, self.hidden_input))
        # a tensor-parallel artifact: every call first reaches the other ranks, which run
        # it on their shards (runtime/parallel.py)
        self.run_graph = parallel.distribute_mtp(self.run_graph, self.graph, self.cache.tensors,
                                                 blocks)
        self.vocab = engine.vocab_size
        self.states: dict[str, _MTPState] = {}
        self.num_mtp_calls = 0

    # ------------------------------------------------------------------ main steps

    def observe(self, chunks) -> None:
        """Keep the main step's hidden states for the MTP layer (before the next step
        overwrites its output buffer)."""
        outs = getattr(self.runner.graphs, "last_outputs", None)
        hidden = None if outs is None else outs.get("hidden_states")
        if hidden is None:
            return
        off, ready = 0, []
        for c in chunks:
            n, req = c.num_new, c.request
            if could_speculate(req):
                rows = hidden[off:off + n].clone()
                st = self.states.get(req.request_id)
                start = c.start
                if st is None or start < st.hid_start or start > st.hid_start + len(st.hid):
                    # the first chunk; a recomputation from before the kept rows
                    # (preemption); or a gap (prefix-cached blocks: no h for them)
                    st = self.states[req.request_id] = _MTPState(start)
                    st.hid = rows
                else:
                    st.hid = torch.cat((st.hid[:start - st.hid_start], rows))
                    st.done = min(st.done, start)
                st.last = None
                # a prompt chunk: its positions but the last already know their next
                # token; compute their MTP KV now rather than keep their rows
                upto = min(st.hid_start + len(st.hid), len(req.all_token_ids) - 1)
                if upto > st.done >= st.hid_start:
                    ready.append((req, st, upto))
            off += n
        if ready:
            self._catch_up(ready)

    def forget(self, req) -> None:
        self.states.pop(req.request_id, None)

    # ------------------------------------------------------------------ proposing

    def _run(self, tokens, positions, hidden, seqs):
        """One MTP call. `seqs`: per sequence (first token index, token count, context
        length, block-table row). Returns (logits of each sequence's last token, hidden
        states of each sequence's last token)."""
        dev, bs = self.device, self.block_size
        width = max(len(s[3]) for s in seqs)
        tables = [s[3] + [0] * (width - len(s[3])) for s in seqs]
        slots = []
        for first, n, ctx, table in seqs:
            for p in range(ctx - n, ctx):
                slots.append(table[p // bs] * bs + p % bs)
        qsl = [0]
        for s in seqs:
            qsl.append(qsl[-1] + s[1])
        last = upload_values([q - 1 for q in qsl[1:]], torch.int64, dev)
        feeds = {
            "input_ids": upload_values(tokens, torch.int64, dev),
            "positions": upload_values(positions, torch.int64, dev),
            "slot_mapping": upload_values(slots, torch.int64, dev),
            "query_start_loc": upload_values(qsl, torch.int32, dev),
            "seq_lens": upload_values([s[2] for s in seqs], torch.int32, dev),
            "block_tables": upload_values(tables, torch.int32, dev),
            "logits_indices": last,
            self.hidden_input: hidden,
        }
        feeds.update(self.cache.tensors)
        out = self.run_graph(feeds)
        self.num_mtp_calls += 1
        logits = out["logits"]
        if not self.logits_pruned:          # -O2 prunes them to the rows of logits_indices
            logits = logits.index_select(0, last)
        return logits, out["hidden_states"].index_select(0, last)

    def _catch_up(self, items):
        """items: (request, state, upto): compute the MTP KV of positions state.done ..
        upto - 1 (their h and next token known), in one call. Returns the logits and
        hidden states of each item's last position."""
        bm = self.engine.block_manager
        tokens, positions, hidden, seqs = [], [], [], []
        for r, st, upto in items:
            tokens += r.all_token_ids[st.done + 1:upto + 1]
            positions += range(st.done, upto)
            hidden.append(st.hid[st.done - st.hid_start:upto - st.hid_start])
            seqs.append((len(tokens), upto - st.done, upto, bm.block_table(r.request_id)))
        logits, h = self._run(tokens, positions, torch.cat(hidden), seqs)
        for r, st, upto in items:
            st.hid = st.hid[upto - st.hid_start:]          # the rows still to consume
            st.hid_start = st.done = upto
        return logits, h

    def propose(self, reqs: list, budgets: list[int]) -> list[list[int]]:
        bm = self.engine.block_manager
        out = {id(r): [] for r in reqs}
        live = []
        for r, b in zip(reqs, budgets):
            st = self.states.get(r.request_id)
            L = len(r.all_token_ids)
            if st is None or st.hid is None or r.request_id not in bm:
                continue
            if st.last is not None and st.last[0] == L:      # proposed already, no step since
                out[id(r)] = st.last[1][:b]
                continue
            if st.hid_start > st.done or st.hid_start + len(st.hid) < L - 1 or st.done >= L - 1:
                continue
            live.append((r, b, st, L))
        if not live:
            return [out[id(r)] for r in reqs]
        # catch up: the MTP KV of every position with h and the next token known
        logits, h = self._catch_up([(r, st, L - 1) for r, b, st, L in live])
        for (r, b, st, L), g in zip(live, logits.argmax(dim=-1).tolist()):
            if self.vocab and g >= self.vocab:          # a padded vocabulary's id: no guess
                continue
            out[id(r)].append(g)
        # chain: guess j + 1 from guess j and the layer's own hidden state
        active = [(i, x) for i, x in enumerate(live) if out[id(x[0])]]
        hs = {i: h[i:i + 1] for i, _ in active}
        step = 1
        while True:
            active = [(i, x) for i, x in active if len(out[id(x[0])]) == step < x[1]]
            if not active:
                break
            tokens, positions, hidden, seqs = [], [], [], []
            for j, (i, (r, b, st, L)) in enumerate(active):
                q = L - 1 + step - 1                      # the position of guess `step`
                table = list(bm.block_table(r.request_id))
                base = self.scratch_base + j * self.scratch_per_seq
                need = q // self.block_size + 1
                table += [base + n for n in range(need - len(table))]
                tokens.append(out[id(r)][-1])
                positions.append(q)
                hidden.append(hs[i])
                seqs.append((len(tokens), 1, q + 1, table))
            logits, h = self._run(tokens, positions, torch.cat(hidden), seqs)
            for j, ((i, (r, b, st, L)), g) in enumerate(zip(active, logits.argmax(-1).tolist())):
                hs[i] = h[j:j + 1]
                if not (self.vocab and g >= self.vocab):
                    out[id(r)].append(g)
            step += 1
        for r, b, st, L in live:
            st.last = (L, list(out[id(r)]))
        return [out[id(r)] for r in reqs]
