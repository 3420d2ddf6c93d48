#!/usr/bin/env python
"""KV-cache bytes per token: DeepSeek-V3's latent cache as braze compiles it, against MHA.

For each shape only config.json is written (no weights); the model is traced
(`load_model(..., with_weights=False)`) and the runtime's `KVCache` is built from the
graph's cache inputs, so the figure is what `braze serve` allocates per token, not
arithmetic from the config. It is compared with what an MHA cache of the same model
would hold: per layer and head, the expanded key (qk_nope + qk_rope) and value
(v_head_dim), which is what attention backends that expand MLA keep.

    python benchmarks/mla_cache.py
    python benchmarks/mla_cache.py --dtype float16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compile_time import deepseek_v3_config  # noqa: E402


def tiny_config():
    from braze.tiny import tiny_config as tc
    return tc("deepseek_v3")


SHAPES = {"deepseek-v3": deepseek_v3_config, "tiny-deepseek-v3": tiny_config}


def measure(name: str, dtype: str) -> dict:
    from braze.frontend import load_model
    from braze.ir.types import torch_dtype
    from braze.runtime.kv_cache import KVCache
    cfg = SHAPES[name]()
    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = load_model(d, dtype=dtype, with_weights=False)
    cache = KVCache(loaded.graph, num_blocks=1)
    per_token = cache.bytes_per_block // cache.block_size
    c = json.loads(cfg.to_json_string())
    item = torch_dtype(loaded.dtype).itemsize
    mha = (c["num_hidden_layers"] * c["num_attention_heads"]
           * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]) * item)
    return {"model": name, "dtype": loaded.dtype, "layers": c["num_hidden_layers"],
            "row": c["kv_lora_rank"] + c["qk_rope_head_dim"], "latent_bytes": per_token,
            "mha_bytes": mha, "ratio": mha / per_token}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"), help="cache dtype (default bfloat16)")
    args = ap.parse_args(argv)
    print("| model | dtype | layers | cached values per token and layer | latent cache B/token "
          "| MHA cache B/token | MHA / latent |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for name in SHAPES:
        r = measure(name, args.dtype)
        print(f"| {r['model']} | {r['dtype']} | {r['layers']} | {r['row']} | "
              f"{r['latent_bytes']:,} | {r['mha_bytes']:,} | {r['ratio']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
