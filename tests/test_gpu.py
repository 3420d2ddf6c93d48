"""GPU tests (pytest -m gpu on a CUDA machine): kernels in bfloat16, cubin reuse, end to end."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45]


@pytest.mark.parametrize("case", ["llama", "mistral-window8", "qwen3-headdim24-tied", "mixtral",
                                  "qwen3_moe-dense-middle", "phi3-longrope-partial-tied",
                                  "gemma3-sandwich-softcap", "gemma4-ple-kvshare-moe",
                                  "qwen2-qkv-bias-tied"])
def test_cuda_bf16_close_to_transformers(store, case):
    """Every position's logits of the cuda backend in bf16 against transformers in bf16 on
    the same GPU. The tolerance is measured, not guessed: transformers' own bf16 run differs
    from its float32 run by some amount (bf16's 8-bit mantissa through the layers, at this
    logit scale); braze's kernels may differ from transformers' bf16 by a few times that,
    never more. Argmax agrees wherever float32's top-2 margin is well above that noise."""
    from braze.runtime import Executor, open_artifact
    from braze.ir.contract import SeqChunk
    from conftest import hf_model, run_step, take_blocks
    art = open_artifact(store.artifact(case, opt_level=2, dtype="bfloat16", targets="sm_80,sm_90"))
    ex = Executor(art, backend="cuda", num_blocks=16)
    # logits are computed only where sampled: each prefix of the prompt is its own sequence
    ours = torch.cat([run_step(ex, [SeqChunk(PROMPT[:p], 0, take_blocks(ex, 1))])
                      for p in range(1, len(PROMPT) + 1)]).float()
    ref = hf_model(store.checkpoint(case)).to("cuda")
    with torch.no_grad():
        f32 = ref(torch.tensor([PROMPT], device="cuda")).logits[0].float()
        b16 = ref.to(torch.bfloat16)(torch.tensor([PROMPT], device="cuda")).logits[0].float()
    noise, err = (b16 - f32).abs(), (ours - b16).abs()
    print(f"\n{case}: |braze - hf bf16| max {err.max():.4f} median {err.median():.5f}; "
          f"|hf bf16 - hf f32| max {noise.max():.4f} median {noise.median():.5f}; "
          f"logit scale {f32.abs().max():.2f}")
    # the median as well as the max: in an MoE a rounding difference can flip one token's
    # expert choice, which moves its logits by a lot without anything being wrong elsewhere
    for stat in (torch.max, torch.median):
        assert stat(err) <= 4 * stat(noise) + 2 ** -8 * f32.abs().max(), (stat.__name__, err, noise)
    noise, err = noise.max().item(), err.max().item()
    top2 = f32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * max(noise, err)
    assert torch.equal(ours.argmax(-1)[clear], f32.argmax(-1)[clear])


def test_cubins_and_jit_agree(store):
    """The stored cubins and kernels JIT-compiled from the shipped source give the same logits."""
    from braze.runtime import Executor, open_artifact
    from braze.ir.contract import SeqChunk
    from conftest import run_step, take_blocks
    art = open_artifact(store.artifact("qwen3_moe-dense-middle", opt_level=2, dtype="bfloat16",
                                       targets="sm_80,sm_90"))
    outs = []
    for use_cubins in (True, False):
        ex = Executor(art, backend="cuda", num_blocks=8)
        if not use_cubins:
            ex.plan.runner.cubins = None
        elif not ex.plan.runner.cubins.usable:
            pytest.skip("artifact built with another triton version than this machine's")
        outs.append(run_step(ex, [SeqChunk(PROMPT, 0, take_blocks(ex, 1))]))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["none", "piecewise", "full"])
def test_engine_on_cuda_equals_reference(store, mode):
    """The whole engine on the GPU (persistent batch, captured graphs, device sampling) gives
    the reference backend's greedy and seeded tokens for a mixed batch (float32 artifact)."""
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    art = store.artifact("llama", opt_level=2, targets="sm_80,sm_90", max_num_tokens=64,
                         max_num_seqs=8)
    prompts = [PROMPT, PROMPT[:3], PROMPT * 3, [1, 5]]
    params = [SamplingParams(max_tokens=12, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)] * 2
    outs = {}
    for backend in ("cuda", "reference"):
        eng = Engine(art, backend=backend, num_kv_blocks=32, cudagraph_mode=mode if backend == "cuda" else None,
                     debug=True)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            eng.add_request(str(i), p, sp)
        res = eng.run_to_completion()
        outs[backend] = [res[str(i)].token_ids for i in range(len(prompts))]
        s = eng.stats()
        assert s["kv_blocks_free"] == s["kv_blocks_total"]
        if backend == "cuda":
            print(f"mode {mode}: {s['cuda_graphs_captured']} graphs in {s['capture_seconds']:.2f}s")
            assert (s["cuda_graphs_captured"] > 0) == (mode != "none")
    # float32 on both: kernel and reference logits differ by ~1e-6, far below any gap the
    # seeded Gumbel-max sampler or the argmax could fall into, so every row agrees exactly
    assert outs["cuda"] == outs["reference"]


def test_kv_offload_on_cuda_equals_everything_on_the_device(store, tmp_path):
    """The host tier's GPU path (gather on the compute stream, non-blocking copy into pinned
    memory picked up at a later step; loads copied back on the load stream while another
    request's steps run, the loading request and a second one with its prefix waiting in
    the scheduler until the copy has landed) and a disk tier give the tokens of an engine
    whose cache holds everything."""
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    art = store.artifact("llama", opt_level=2, targets="sm_80,sm_90", max_num_tokens=64,
                         max_num_seqs=8)
    g = torch.Generator().manual_seed(3)
    shared = [1] + torch.randint(3, 200, (69,), generator=g).tolist()
    fillers = [[1] + torch.randint(3, 200, (60 + i,), generator=g).tolist() for i in range(6)]
    fresh = [1] + torch.randint(3, 200, (24,), generator=g).tolist()
    traffic = [[shared + [5, 6]], fillers, [fresh, shared + [7, 8, 9], shared + [4]]]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    runs = {}
    for name, kw in (("device", dict(num_kv_blocks=256)),
                     ("host", dict(num_kv_blocks=12, kv_offload_cpu_gb=0.01)),
                     ("disk", dict(num_kv_blocks=12, kv_offload_cpu_gb=0.0005,
                                   kv_offload_dir=str(tmp_path / "kv")))):
        eng = Engine(art, backend="cuda", **kw)
        out = []
        for k, batch in enumerate(traffic):
            for i, p in enumerate(batch):
                eng.add_request(f"{k}.{i}", p, sp)
            res = eng.run_to_completion()
            out += [res[f"{k}.{i}"].token_ids for i in range(len(batch))]
            if eng.offload is not None:
                eng.offload.drain()
        runs[name] = out
        if eng.offload is not None:
            s = eng.stats()
            print(name, {k: v for k, v in s.items() if k.startswith("kv_offload_")})
            assert s["kv_offload_load_blocks_host"] + s["kv_offload_load_blocks_lower"] >= 4
    assert runs["host"] == runs["device"] and runs["disk"] == runs["device"]


def test_cuda_speculative_ngram_equals_plain_decoding(store):
    """Verification steps replay the whole-step CUDA graph of their bucket (R logits rows),
    decode-only steps its decode variant: the speculating engine's greedy tokens are the plain
    engine's (float32, so that a verification's attention order cannot flip a near tie)."""
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    from conftest import run_all
    art = store.artifact("llama", opt_level=2, targets="sm_80,sm_90", max_num_seqs=16,
                         max_logits_rows=64, cudagraph_mode="full")
    prompts = [[1] + [5, 6, 7, 8, 9] * 6, [1, 40, 41, 42] * 4, PROMPT]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    plain = run_all(Engine(art, backend="cuda", num_kv_blocks=64), prompts, params)
    eng = Engine(art, backend="cuda", num_kv_blocks=64,
                 speculative={"method": "ngram", "num_speculative_tokens": 3})
    got = run_all(eng, prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    s = eng.stats()
    assert s["spec_decode_num_draft_tokens"] > 0 and s["cuda_graphs_captured"] > 0
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_cuda_grammar_requests_overlap_and_equal_the_synchronous_engine(store):
    """On the GPU async scheduling is on by default, and grammar-constrained requests take
    its split step (forward launched, the previous tokens read and the matchers advanced
    meanwhile, then the masked sampling): outputs equal the reference backend's synchronous
    run, and the steps did overlap (float32 artifact, as above)."""
    pytest.importorskip("xgrammar")      # benchmarks/device_wheels.sh carries it
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    from conftest import run_all
    art = store.artifact("llama", opt_level=2, targets="sm_80,sm_90", max_num_seqs=8)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    prompts = [PROMPT, PROMPT[:3], PROMPT * 2, [1, 5]]
    params = [SamplingParams(max_tokens=24, temperature=0.8, seed=3,
                             structured_outputs={"json": schema}),
              SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=16, seed=5, temperature=1.0,
                             structured_outputs={"regex": "(alpha|beta) [a-z]{1,3}\\."}),
              SamplingParams(max_tokens=12, temperature=0.8, seed=9, ignore_eos=True)]
    got = {}
    for backend in ("cuda", "reference"):
        eng = Engine(art, backend=backend, num_kv_blocks=32,
                     async_scheduling=backend == "cuda")
        got[backend] = [o.token_ids for o in run_all(eng, prompts, params)]
        s = eng.stats()
        assert s["kv_blocks_free"] == s["kv_blocks_total"]
        assert (s["overlapped_steps"] > 0) == (backend == "cuda")
    assert got["cuda"] == got["reference"]


def test_serving_steps_make_no_hidden_host_synchronisation(store):
    """Past the warm-up, the engine's steps with requests arriving (each one's sampling
    settings written to the device), sampling and penalties, and KV blocks stored to the
    host tier call no torch op that makes the host wait for the GPU (torch's sync debug
    mode): the one wait per step is the designed read of the sampled tokens, which is an
    event's, not an op's. Any such op is a bubble in the step pipeline; the failure lists
    where each one is (tests/test_uploads.py checks the uploads on the CPU)."""
    import warnings
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    art = store.artifact("llama", opt_level=2, targets="sm_80,sm_90", max_num_tokens=64,
                         max_num_seqs=8)
    eng = Engine(art, backend="cuda", num_kv_blocks=64, kv_offload_cpu_gb=0.01)
    params = [SamplingParams(max_tokens=24, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, top_k=20, seed=7,
                             presence_penalty=0.5, repetition_penalty=1.1, ignore_eos=True)]
    eng.add_request("warm", PROMPT, params[1])
    eng.run_to_completion()                       # captures the graphs, compiles, allocates
    seen = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(4):                    # arrivals between steps, mid-run
                eng.add_request(str(i), PROMPT * (i + 1) + [i + 2], params[i % 2])
                for _ in range(3):
                    eng.step()
            eng.run_to_completion()
        seen = sorted({f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught
                       if "synchroniz" in str(w.message)})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print("\nhost synchronisations:\n" + "\n".join(seen))
    assert not seen


def _repeat(launches, workspaces, env, sizes, out, times, skip_idle=False):
    """Run a node's launches `times` times through one PlanRunner (its workspaces kept, as a
    bound plan's are) on the GPU: every result, and the zeroed workspaces after each run."""
    from braze.kernel_modules import KernelModules
    from braze.runtime.launcher import PlanRunner
    from kernel_helpers import KERNEL_DIR
    runner = PlanRunner(KernelModules(KERNEL_DIR, interpret=False), workspaces, device="cuda")
    results = []
    for _ in range(times):
        env[out].fill_(float("nan"))
        for launch in launches:
            if not (skip_idle and launch.get("decode_idle")):
                runner.run(launch, env, sizes)
        results.append(env[out].clone())
    torch.cuda.synchronize()
    zeroed = [t for (name, _), t in runner._ws.items() if workspaces[name].get("zero")]
    return results, zeroed


@pytest.mark.parametrize("skip_idle", [False, True])
def test_split_kv_attention_is_race_free(skip_idle):
    """The decode path's splits combine themselves: the last to arrive (an acq_rel atomic)
    sums the partials the others wrote. At the Llama-3-8B shape in bf16, long decodes split
    into many programs racing each other; 200 launches must give the same bits (the sum is
    in split order whoever is last), the reference's values, zeros on the padding rows of a
    decode step padded to T == S without the prefill path, and counts back at 0."""
    from braze.ir import run_graph
    from kernel_helpers import lower_node
    from test_kernel_attention import _graph, _step
    g = _graph("attention", 32, 8, 128, 16, "bf16")
    feeds, sizes = _step(g, [(4000, 1), (1500, 1), (0, 0), (0, 0)], pad=2, seed=1)
    feeds = {k: v.cuda() for k, v in feeds.items()}
    want = run_graph(g, {k: v.clone() for k, v in feeds.items()}, {})["o"]
    launches, workspaces, _ = lower_node(g, 0)
    out = g.nodes[0].results[0]
    env = {v.ref: feeds[v.name] for v in g.inputs}
    env[out.ref] = torch.empty_like(want)
    results, zeroed = _repeat(launches, workspaces, env, sizes, out.ref, 200, skip_idle)
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0].float(), want.float(), atol=2e-2, rtol=2e-2)
    assert not results[0][2:].any()
    assert zeroed and all(not t.any() for t in zeroed)


@pytest.mark.parametrize("m", [1, 16])
def test_split_k_skinny_gemm_is_race_free(m):
    """The skinny GEMM's last split of a tile sums the partials (Llama-3.2-1B down_proj: K =
    8192 in 3 splits): 200 launches give the same bits, F.linear's values, counts at 0."""
    import torch.nn.functional as F
    from braze.codegen.kernels import skinny_gemm
    from test_kernel_skinny_gemm import _graph, _launches
    g = _graph(2048, 8192, "bf16", False)
    L = _launches(g)
    assert L.launches[0]["constexprs"]["SPLIT_K"] > 1, skinny_gemm.plan(2048, 8192, "bf16")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, 8192, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(2048, 8192, generator=gen) / 64).to(torch.bfloat16).cuda()
    out = g.nodes[-1].results[0].ref
    env = {"%x": x, "@w": w, out: torch.empty(m, 2048, dtype=torch.bfloat16, device="cuda")}
    results, zeroed = _repeat(L.launches, L.workspaces, env, {"T": m, "S": m, "R": m, "MB": 1},
                              out, 200)
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0].float(), F.linear(x.float(), w.float()),
                               atol=2e-2, rtol=2e-2)
    assert zeroed and all(not t.any() for t in zeroed)
