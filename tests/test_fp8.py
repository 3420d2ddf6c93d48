"""FP8 checkpoints with block scales (DeepSeek-V3's format; frontend/fp8.py).

- a tiny DeepSeek-V3 with an MTP layer, in float8_e4m3fn with 8x8 block scales (every
  block whole), in 3 shards, compiled at -O0 and -O2, gives the logits of transformers
  loading the same checkpoint with its own fp8 dequantization
  (FineGrainedFP8Config(dequantize=True)); the MTP layer's weights are dequantized too;
- a tiny Llama with 48x48 blocks (partial blocks at the right and bottom edges, which
  transformers refuses) gives the logits of transformers on weights dequantized by a
  torch-math reference; that reference equals `dequantize_blocks` for any shapes;
- compiling reads the shards one file at a time (a spy on safetensors' file opens);
- the artifact records the source (manifest, `braze inspect`), its config.json carries no
  quantization_config, and no `*_scale_inv` tensor reaches the artifact;
- every unsupported quantization_config field gets its one-line error, and so do
  fp8 weights without scales and scales of the wrong block size.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import braze
from braze.frontend import weights as weights_module
from braze.frontend.fp8 import FP8Checkpoint, FP8Scheme, dequantize_blocks
from braze.ir.errors import BrazeError
from braze.runtime import Executor, open_artifact
from braze.tiny import make_checkpoint
from braze.tiny_mtp import with_mtp_layer
from braze.tiny_fp8 import fp8_checkpoint, quantize_fp8

from conftest import assert_steps_match


class _OpenSpy:
    """Stands in for safetensors' safe_open in the frontend: counts the files open at once
    (a handle is closed when the checkpoint drops it) and which files were opened."""

    def __init__(self):
        self.live, self.peak, self.opened = 0, 0, []

    def __call__(self, path, framework):
        handle = _Handle(safe_open(path, framework=framework))
        self.opened.append(Path(path).name)
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(handle, self._closed)
        return handle

    def _closed(self):
        self.live -= 1


class _Handle:
    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _compile(src, out, opt_level, **kw):
    logs = []
    braze.compile(src, out, opt_level=opt_level, targets="", dtype="float32",
                  log=logs.append, **kw)
    return out, logs


def _hf(path, **kw):
    from transformers import AutoModelForCausalLM
    with contextlib.redirect_stderr(io.StringIO()):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """A tiny DeepSeek-V3 with an MTP layer in fp8 (8x8 blocks, 3 shards), its -O0 and -O2
    artifacts (the -O0 compile under the file-open spy) and the -O0 compile log."""
    d = tmp_path_factory.mktemp("fp8ds")
    with contextlib.redirect_stderr(io.StringIO()):
        make_checkpoint("deepseek_v3", d / "main", seed=1)
    base = d / "base"
    with_mtp_layer(d / "main", base)
    ckpt = fp8_checkpoint(base, d / "fp8", block=(8, 8), shards=3)
    spy = _OpenSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights_module, "safe_open", spy)
        art0, logs = _compile(ckpt, d / "a0", 0)
    art2, _ = _compile(ckpt, d / "a2", 2)
    return {"ckpt": ckpt, "arts": {0: art0, 2: art2}, "logs": logs, "spy": spy}


@pytest.mark.parametrize("opt_level", [0, 2])
def test_deepseek_fp8_equals_transformers_fp8_dequantization(ds, opt_level):
    from transformers import FineGrainedFP8Config
    theirs = _hf(ds["ckpt"], quantization_config=FineGrainedFP8Config(dequantize=True))
    ex = Executor(open_artifact(ds["arts"][opt_level]), backend="reference", num_blocks=8)
    assert_steps_match(ex, theirs)


def test_the_comparison_sees_the_scales(ds):
    """Guard: transformers' fp8 model is not the float one (quantization changes the logits
    far beyond the tolerance), so dropping or misplacing a scale cannot pass above."""
    from transformers import FineGrainedFP8Config
    ids = torch.tensor([[1, 17, 93, 4, 250]])
    with torch.no_grad():
        a = _hf(ds["ckpt"], quantization_config=FineGrainedFP8Config(dequantize=True))(ids).logits
        b = _hf(ds["ckpt"].parent / "base")(ids).logits
    assert (a - b).abs().max() > 1e-2


def _reference_dequantize(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """Torch math: each scale repeated over its block, the grid cut to the weight."""
    rows, cols = q.shape
    full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return q.to(torch.float32) * full


def test_partial_edge_blocks_equal_a_torch_reference(tmp_path):
    """Llama dims 64, 128, 32 in 48x48 blocks: partial blocks on both edges."""
    with contextlib.redirect_stderr(io.StringIO()):
        base = make_checkpoint("llama", tmp_path / "base", seed=3, with_tokenizer=False)
    ckpt = fp8_checkpoint(base, tmp_path / "fp8", block=(48, 48))
    stored = load_file(ckpt / "model.safetensors")
    ref = {}
    for name, t in stored.items():
        if name.endswith("_scale_inv"):
            continue
        s = stored.get(name + "_scale_inv")
        ref[name] = t if s is None else _reference_dequantize(t, s, (48, 48))
    assert any(t.shape[0] % 48 and t.shape[1] % 48 for n, t in stored.items()
               if n + "_scale_inv" in stored)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text((base / "config.json").read_text())
    save_file(ref, tmp_path / "ref" / "model.safetensors", metadata={"format": "pt"})
    art, _ = _compile(ckpt, tmp_path / "a", 0)
    ex = Executor(open_artifact(art), backend="reference", num_blocks=8)
    assert_steps_match(ex, _hf(tmp_path / "ref"))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), br=st.integers(1, 16),
       bc=st.integers(1, 16), seed=st.integers(0, 2**16))
def test_dequantize_blocks_equals_the_reference(rows, cols, br, bc, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q, s = quantize_fp8(w, (br, bc))
    assert s.shape == (math.ceil(rows / br), math.ceil(cols / bc))
    got = dequantize_blocks(q, s, (br, bc))
    torch.testing.assert_close(got, _reference_dequantize(q, s, (br, bc)), rtol=0, atol=0)
    # and it is the weight, to e4m3's precision: 3 mantissa bits (1/16 relative), and
    # subnormals 2**-9 apart (in units of the block's scale)
    scale = s.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    assert ((got - w).abs() <= w.abs() / 16 + scale * 2**-10 + 1e-7).all()


def test_mtp_layer_weights_are_dequantized(ds):
    """The MTP layer DeepSeek-V3 ships in fp8 too: its artifact weights (mtp-*.safetensors)
    are the torch reference's dequantization of the checkpoint's."""
    stored = {}
    for f in ds["ckpt"].glob("*.safetensors"):
        stored.update(load_file(f))
    art = ds["arts"][0]
    shipped = {}
    for f in json.loads((art / "manifest.json").read_text())["mtp"]["files"]:
        shipped.update(load_file(art / f))
    def reference(n):
        return _reference_dequantize(stored[n], stored[n + "_scale_inv"], (8, 8))

    quantized = [n for n in shipped if n + "_scale_inv" in stored]
    assert "model.layers.2.eh_proj.weight" in quantized and len(quantized) >= 5
    for n in quantized:
        torch.testing.assert_close(shipped[n], reference(n), rtol=0, atol=0)
    experts = "model.layers.2.mlp.experts.gate_proj"       # stacked from the 8 experts
    torch.testing.assert_close(shipped[experts], torch.stack(
        [reference(f"model.layers.2.mlp.experts.{e}.gate_proj.weight") for e in range(8)]),
        rtol=0, atol=0)


def test_shards_are_read_one_file_at_a_time(ds):
    spy, ckpt = ds["spy"], ds["ckpt"]
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) == 3 and set(spy.opened) == set(shards)
    assert spy.peak == 1


def test_artifact_records_the_source_and_holds_plain_weights(ds):
    from braze.inspect import format_summary, summarize
    art = ds["arts"][0]
    manifest = json.loads((art / "manifest.json").read_text())
    src = manifest["model"]["source"]
    n_scales = sum(1 for f in ds["ckpt"].glob("*.safetensors")
                   for k in safe_open(str(f), "pt").keys() if k.endswith("_scale_inv"))
    assert src["format"] == "fp8-e4m3" and src["weight_block_size"] == [8, 8]
    assert src["quantized_tensors"] == n_scales
    assert src["summary"] == "fp8-e4m3 block 8x8 dequantized to f32"
    config = json.loads((art / "config.json").read_text())
    original = json.loads((ds["ckpt"] / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == {k: v for k, v in original.items() if k != "quantization_config"}
    for f in manifest["weights"]["files"]:
        with safe_open(str(art / f), "pt") as h:
            assert not any(k.endswith("_scale_inv") for k in h.keys())
            assert all(h.get_slice(k).get_dtype() == "F32" for k in h.keys())
    text = format_summary(summarize(art))
    assert ("source     fp8-e4m3 block 8x8 dequantized to f32 at compile time "
            f"({n_scales} fp8 weights with block scales)") in text.splitlines()


def test_dequantizing_reports_progress(ds):
    log = "\n".join(ds["logs"])
    manifest = json.loads((ds["arts"][0] / "manifest.json").read_text())
    n = manifest["model"]["source"]["quantized_tensors"]
    assert f"fp8 checkpoint: {n} weights in float8_e4m3fn with 8x8 block scales" in log
    assert f"dequantized {n}/{n} fp8 tensors" in log


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8llama")
    with contextlib.redirect_stderr(io.StringIO()):
        base = make_checkpoint("llama", d / "base", seed=2, with_tokenizer=False)
    return fp8_checkpoint(base, d / "fp8", block=(16, 16))


GOOD = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [16, 16]}


@pytest.mark.parametrize("field,value", [
    ("quant_method", "awq"), ("quant_method", "gptq"), ("fmt", "e5m2"),
    ("activation_scheme", "static"), ("weight_block_size", [128]),
    ("weight_block_size", [128, 128, 1]), ("weight_block_size", [0, 128]),
    ("weight_block_size", None),
])
def test_unsupported_quantization_config_fields_are_refused(tiny_fp8, tmp_path, field, value):
    d = tmp_path / "m"
    d.mkdir()
    for f in tiny_fp8.iterdir():
        (d / f.name).symlink_to(f)
    cfg = json.loads((tiny_fp8 / "config.json").read_text())
    cfg["quantization_config"] = {**GOOD, field: value}
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BrazeError) as e:
        braze.compile(d, tmp_path / "a", targets="", dtype="float32")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"quantization_config.{field} is {value!r}" in msg
    assert "'fp8'" in msg and "'e4m3'" in msg and "'dynamic'" in msg


def test_fp8_weight_without_its_scale_is_refused(tiny_fp8, tmp_path):
    w = load_file(tiny_fp8 / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    del w[name + "_scale_inv"]
    d = tmp_path / "m"
    d.mkdir()
    save_file(w, d / "model.safetensors")
    with pytest.raises(BrazeError, match=f"weight '{name}' is stored in torch.float8_e4m3fn "
                                         f"but .* has no '{name}_scale_inv'"):
        FP8Checkpoint(d, FP8Scheme((16, 16))).get(name)


def test_scales_of_another_block_size_are_refused(tiny_fp8):
    ckpt = FP8Checkpoint(tiny_fp8, FP8Scheme((32, 32)))     # stored with 16x16 blocks
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(BrazeError, match=f"'{name}_scale_inv' has shape \\[8, 4\\], but weight "
                                         f"\\[128, 64\\] in 32x32 blocks needs \\[4, 2\\]"):
        ckpt.get(name)
    assert name + "_scale_inv" not in ckpt.names() and name in ckpt.names()
