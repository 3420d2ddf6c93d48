#!/usr/bin/env python
"""LoRA serving costs: what loading an adapter costs the host, and what adapters cost a
decode step.

A random Llama checkpoint (braze/tiny.py's tiny_config with the --hidden/--layers/
--intermediate/--heads given) is compiled twice at -O2: plain, and with
`--lora-slots 4 --max-lora-rank --rank`. Random PEFT-format adapters (every target
module, rank --rank) are written by hand, so peft is not needed.

  load     per adapter: `LoRAManager.read` (adapter_config.json + safetensors parsed and
           laid out as the artifact's pools want, scale folded into B) and the slot write
           (the copies into the device pools, done when a request first uses it); best of
           --repeat, with the adapter's size on disk
  decode   ms per decode step with --batch requests all decoding, --steps steps timed
           after warm-up (prefill excluded), for:
             base artifact       the plain artifact (the cost of no LoRA at all)
             lora, 0 adapters    the LoRA artifact, every request on the base model
             lora, 1 adapter     every request on one adapter
             lora, 4 adapters    requests spread over four adapters

On the CPU the reference backend runs the IR with torch (the lora op's reference loops
over the K slots with masks: it does K times the work the kernels do); with --backend
cuda the shrink/expand Triton kernels run inside the captured CUDA graphs.

    python benchmarks/lora.py                                    # CPU defaults
    python benchmarks/lora.py --backend cuda --hidden 2048 --layers 16 --intermediate 8192 \
        --heads 32 --kv-heads 8 --batch 32 --rank 16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arg_checks import at_least, cuda_needed  # noqa: E402


def write_adapter(out: Path, spec: dict, rank: int, seed: int) -> Path:
    """A random adapter over every q/k/v/o/gate/up/down linear, by hand in PEFT's format."""
    from safetensors.torch import save_file
    H, I, L = spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"]
    D = spec.get("head_dim") or H // spec["num_attention_heads"]
    q, kv = spec["num_attention_heads"] * D, spec["num_key_value_heads"] * D
    shapes = {"self_attn.q_proj": (q, H), "self_attn.k_proj": (kv, H), "self_attn.v_proj": (kv, H),
              "self_attn.o_proj": (H, q), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H),
              "mlp.down_proj": (H, I)}
    g = torch.Generator().manual_seed(seed)
    t = {}
    for layer in range(L):
        for m, (o, i) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{m}"
            t[f"{key}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.05
            t[f"{key}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.05
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": [m.split(".")[1] for m in shapes]}))
    save_file(t, str(out / "adapter_model.safetensors"))
    return out


def decode_ms(art, backend: str, batch: int, steps: int, loras: list) -> tuple[float, float]:
    """Median ms of an engine step with `batch` requests decoding (loras[i]: request i's):
    wall clock, and the stepping thread's CPU time (on the CPU with one torch thread that
    is all the step's work, and a busy shared machine does not inflate it)."""
    from braze.runtime.engine import Engine
    from braze.runtime.sampler import SamplingParams
    eng = Engine(art, backend=backend, max_num_seqs=batch)
    sp = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        prompt = [1] + torch.randint(3, 200, (15,), generator=g).tolist()
        eng.add_request(f"r{i}", prompt, sp, lora_request=loras[i])
    while eng.num_waiting() or any(r.num_computed < len(r.prompt_token_ids)
                                   for r in eng.requests.values()):
        eng.step()                       # prefill and admission, untimed
    for _ in range(3):
        eng.step()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        eng.step()
        if backend == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.thread_time() - c0) * 1000)
    return statistics.median(times), statistics.median(cpu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="reference", choices=("reference", "interpret", "cuda"))
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default=None, help="compile dtype (default float32 on the CPU, "
                                                  "bfloat16 on cuda)")
    a = ap.parse_args(argv)
    at_least(ap, a, hidden=1, intermediate=1, layers=1, heads=1, kv_heads=1, rank=1, batch=1,
             steps=1, repeat=1)
    if a.hidden % a.heads or a.heads % a.kv_heads:
        ap.error(f"--hidden {a.hidden}, --heads {a.heads}, --kv-heads {a.kv_heads}: the heads "
                 "must divide --hidden and the KV heads the heads")
    if a.backend == "cuda":
        cuda_needed(ap, "--backend cuda")
    if a.backend != "cuda":
        torch.set_num_threads(1)         # the step's CPU work all on the timed thread
    import braze
    from braze.runtime.lora import Contract, LoRAManager, LoRARequest, allocate_pools
    from braze.runtime.loader import open_artifact
    from braze.tiny import make_checkpoint
    dtype = a.dtype or ("bfloat16" if a.backend == "cuda" else "float32")
    targets = "sm_80,sm_90" if a.backend == "cuda" else ""
    with tempfile.TemporaryDirectory(prefix="braze-lora-bench-") as tmp:
        tmp = Path(tmp)
        with contextlib.redirect_stderr(io.StringIO()):
            ck = make_checkpoint("llama", tmp / "model", seed=0, hidden_size=a.hidden,
                                 intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                                 num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                                 head_dim=a.hidden // a.heads)
        common = dict(opt_level=2, dtype=dtype, targets=targets, max_num_seqs=max(a.batch, 4),
                      max_num_tokens=max(256, a.batch * 16), max_model_len=256)
        plain = braze.compile(ck, tmp / "plain.braze", **common)
        lora = braze.compile(ck, tmp / "lora.braze", lora_slots=4, max_lora_rank=a.rank, **common)
        spec = json.loads((ck / "config.json").read_text())
        paths = [write_adapter(tmp / f"ad{i}", spec, a.rank, i) for i in range(4)]
        mb = (paths[0] / "adapter_model.safetensors").stat().st_size / 2**20

        # load: parse + layout, then the slot write
        art = open_artifact(lora.root)
        device = "cuda" if a.backend == "cuda" else "cpu"
        contract = Contract.from_manifest(art.manifest)
        reads, writes = [], []
        for r in range(a.repeat):
            m = LoRAManager(contract, allocate_pools(art.graph, device))
            req = LoRARequest(f"x{r}", r + 1, str(paths[r % 4]))
            t0 = time.perf_counter()
            host = m.read(req)
            t1 = time.perf_counter()
            key = m.add(req, host)
            t2 = time.perf_counter()
            m.acquire(key)
            if device == "cuda":
                torch.cuda.synchronize()
            t3 = time.perf_counter()
            reads.append((t1 - t0) * 1000)
            writes.append((t3 - t2) * 1000)
        print(f"adapter: rank {a.rank}, {a.layers} layers x 7 modules, "
              f"{mb:.2f} MiB on disk ({dtype} pools)")
        print(f"load: read+layout {min(reads):.2f} ms, slot write {min(writes):.3f} ms "
              f"(best of {a.repeat})")

        reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(paths)]
        rows = [("base artifact (no --lora-slots)", plain, [None] * a.batch),
                ("lora artifact, 0 adapters", lora, [None] * a.batch),
                ("lora artifact, 1 adapter", lora, [reqs[0]] * a.batch),
                ("lora artifact, 4 adapters", lora, [reqs[i % 4] for i in range(a.batch)])]
        print(f"decode, batch {a.batch}, {a.backend}, median of {a.steps} steps "
              f"(wall ms/step, thread CPU ms/step):")
        for name, artifact, loras in rows:
            ms, cpu = decode_ms(artifact.root, a.backend, a.batch, a.steps, loras)
            print(f"  {name:<34} {ms:8.2f} {cpu:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
