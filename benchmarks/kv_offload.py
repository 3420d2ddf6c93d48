#!/usr/bin/env python
"""Time to first token of a long repeated prefix: computed, loaded from the host tier, and
loaded from the disk tier (runtime/kv_offload.py).

A tiny random Llama is compiled for --prefix-tokens + 64 tokens. Three runs of the same
request (the prefix plus a short distinct suffix), each after the prefix was served once:

    computed   no offload, and the device's prefix cache flushed: the prefix is prefilled
    host       the prefix was stored to the host tier, the device's prefix cache flushed:
               its blocks are copied back from host memory
    disk       a fresh engine on the same --kv-offload-dir (nothing on the device or in its
               host tier): the blocks are staged from disk, then copied in

The time is Engine.step calls until the request's first token, on the backend given
(reference on a CPU: the prefill is the model's real work on the host; cuda on a GPU).
Also reported: KV bytes per token of the model, and the bytes moved per tier.

A fourth case, `host beside a decoder`, loads the prefix from the host tier while another
request decodes: the neighbour's inter-token latency before the load arrived (median) and
until the loaded request's first token (max). On a GPU the load's copy runs on its own
stream while the neighbour's steps go on; the max says how much of it they still wait for
(on the CPU the copy is synchronous, so the max includes it).

--kv-shape 8b gives the tiny model Llama-3-8B's KV per token (32 layers, 8 KV heads of 128:
128 KiB in bfloat16), so the bytes moved are a real 8B's; the model's other work stays tiny.

    python benchmarks/kv_offload.py                       # 32k-token prefix, CPU
    python benchmarks/kv_offload.py --prefix-tokens 8192 --json kv.json
    python benchmarks/kv_offload.py --backend cuda --kv-shape 8b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from arg_checks import at_least, cuda_needed
from results_file import ResultsFile


def build(tmp: Path, args) -> Path:
    import braze
    from braze.tiny import make_checkpoint

    total = args.prefix_tokens + 64
    shape = dict(num_hidden_layers=args.layers)
    if args.kv_shape == "8b":
        shape = dict(num_hidden_layers=32, hidden_size=1024, num_attention_heads=8,
                     num_key_value_heads=8, head_dim=128, intermediate_size=2048)
    with contextlib.redirect_stderr(io.StringIO()):
        ckpt = make_checkpoint("llama", tmp / "model", seed=0, max_position_embeddings=total,
                               **shape)
    out = tmp / "kv.braze"
    braze.compile(ckpt, out, targets="", max_model_len=total, max_num_seqs=4,
                  max_num_tokens=args.max_num_tokens, dtype=args.dtype)
    return out


def ttft(eng, rid: str, prompt: list[int]) -> float:
    from braze.runtime.sampler import SamplingParams

    t = time.perf_counter()
    eng.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while True:
        if any(o.request_id == rid and o.new_token_ids for o in eng.step()):
            return time.perf_counter() - t


def beside_a_decoder(eng, rid: str, prompt: list[int], before: int = 8) -> dict:
    """A short request decodes; after `before` of its tokens `prompt` arrives. The
    neighbour's inter-token latencies before it arrived and until its first token."""
    from braze.runtime.sampler import SamplingParams

    eng.add_request("neighbour", [1, 9, 8, 7, 6, 5], SamplingParams(max_tokens=1 << 20,
                                                                    ignore_eos=True))
    gaps, last, t_arrival, during = [], None, None, []
    while True:
        outs = eng.step()
        t = time.perf_counter()
        if any(o.request_id == "neighbour" and o.new_token_ids for o in outs):
            if last is not None:
                (during if t_arrival is not None else gaps).append(t - last)
            last = t
        if t_arrival is None and len(gaps) >= before:
            t_arrival = time.perf_counter()
            eng.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        if t_arrival is not None and any(o.request_id == rid and o.new_token_ids for o in outs):
            break
    eng.abort_request("neighbour")
    while eng.has_unfinished():
        eng.step()
    gaps.sort()
    return {"ttft_s": t - t_arrival, "neighbour_itl_median_before_s": gaps[len(gaps) // 2],
            "neighbour_itl_max_during_s": max(during, default=0.0),
            "neighbour_tokens_during": len(during)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix-tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-num-tokens", type=int, default=2048)
    ap.add_argument("--backend", default="reference", choices=("auto", "reference", "interpret", "cuda"))
    ap.add_argument("--kv-shape", choices=("tiny", "8b"), default="tiny",
                    help="8b: Llama-3-8B's KV bytes per token (tiny: --layers of the tiny "
                         "model)")
    ap.add_argument("--dtype", default="float32",
                    help="the artifact's dtype (bfloat16 on a GPU; the CPU interpreter "
                         "wants float32)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    at_least(ap, args, prefix_tokens=2, layers=1, max_num_tokens=1)
    if args.backend == "cuda":
        cuda_needed(ap, "--backend cuda")

    import torch
    from braze.runtime.engine import Engine

    g = torch.Generator().manual_seed(0)
    prefix = [1] + torch.randint(3, 200, (args.prefix_tokens - 1,), generator=g).tolist()
    first, second, third = (prefix + [5 + i, 6 + i, 7 + i] for i in range(3))
    out = ResultsFile(args.json, {
        "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(), "config": vars(args)})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        art = build(tmp, args)
        print(f"compiled a {args.layers}-layer tiny llama for {args.prefix_tokens + 64} tokens "
              f"in {time.perf_counter() - t0:.1f}s; backend {args.backend}", flush=True)
        kw = dict(backend=args.backend)

        eng = Engine(art, **kw)
        bpt = eng.runner.executor.cache.bytes_per_block / eng.runner.block_size
        ttft(eng, "warm", first)
        eng.block_manager.reset_prefix_cache()
        out.add({"case": "computed", "ttft_s": ttft(eng, "a", second)})
        print(f"computed: {out.results[-1]['ttft_s'] * 1000:.0f} ms", flush=True)
        del eng

        gb = 2 * args.prefix_tokens * bpt / (1 << 30) + 0.01
        eng = Engine(art, kv_offload_cpu_gb=gb, **kw)
        ttft(eng, "warm", first)
        eng.offload.drain()
        eng.block_manager.reset_prefix_cache()
        out.add({"case": "host", "ttft_s": ttft(eng, "a", second),
                 "loaded_blocks": eng.stats()["kv_offload_load_blocks_host"],
                 "bytes": eng.stats()["kv_offload_load_bytes_host"]})
        print(f"host: {out.results[-1]['ttft_s'] * 1000:.0f} ms", flush=True)
        eng.block_manager.reset_prefix_cache()
        loaded = eng.stats()["kv_offload_load_blocks_host"]
        row = beside_a_decoder(eng, "b", second)
        row.update(case="host beside a decoder",
                   loaded_blocks=eng.stats()["kv_offload_load_blocks_host"] - loaded)
        out.add(row)
        print(f"host beside a decoder: {row['ttft_s'] * 1000:.0f} ms; the neighbour's "
              f"inter-token latency {row['neighbour_itl_median_before_s'] * 1000:.1f} ms "
              f"before, at most {row['neighbour_itl_max_during_s'] * 1000:.1f} ms during",
              flush=True)
        del eng

        kv = str(tmp / "kvdir")
        eng = Engine(art, kv_offload_cpu_gb=gb, kv_offload_dir=kv, **kw)
        ttft(eng, "warm", first)
        eng.offload.drain()
        eng.offload.close()
        del eng
        eng = Engine(art, kv_offload_cpu_gb=gb, kv_offload_dir=kv, **kw)
        out.add({"case": "disk", "ttft_s": ttft(eng, "a", third),
                 "loaded_blocks": eng.stats()["kv_offload_load_blocks_lower"],
                 "bytes": eng.stats()["kv_offload_load_bytes_lower"]})
        print(f"disk: {out.results[-1]['ttft_s'] * 1000:.0f} ms", flush=True)
    rows = {r["case"]: r for r in out.results}
    print(f"\n| prefix {args.prefix_tokens} tokens, {bpt:.0f} KV bytes/token | TTFT ms | "
          f"vs computed | blocks loaded |")
    print("|---|---:|---:|---:|")
    for case in ("computed", "host", "disk", "host beside a decoder"):
        r = rows[case]
        print(f"| {case} | {r['ttft_s'] * 1000:.0f} | "
              f"{rows['computed']['ttft_s'] / r['ttft_s']:.1f}x | {r.get('loaded_blocks', '-')} |")
    r = rows["host beside a decoder"]
    print(f"\nthe neighbour's inter-token latency: median "
          f"{r['neighbour_itl_median_before_s'] * 1000:.1f} ms before the load, max "
          f"{r['neighbour_itl_max_during_s'] * 1000:.1f} ms until the loaded request's first "
          f"token ({r['neighbour_tokens_during']} tokens)")
    out.finish(kv_bytes_per_token=bpt)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
