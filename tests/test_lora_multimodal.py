"""LoRA adapters that peft trained on a multimodal ConditionalGeneration model, served by the
artifact of its language model (compiled text-only): the adapter's language-model modules
are found under the text model's names, its vision/audio tower and projector modules are
ignored (they act on image and audio input only, which a text-only artifact never takes),
and the greedy tokens equal transformers + peft on the ConditionalGeneration model with text
input. An adapter with nothing for the language model is refused."""

from __future__ import annotations

import pytest
import torch

from braze.runtime.llm import LLM
from braze.runtime.lora import LoRAError, LoRARequest
from braze.runtime.sampler import SamplingParams
from braze.tiny_multimodal import make_multimodal_checkpoint
from conftest import _Store
from lora_helpers import make_adapter, peft_greedy, peft_model, write_adapter

PROMPT = [1, 17, 93, 4, 200, 66, 7, 31, 128, 9]
LORA = dict(lora_slots=2, max_lora_rank=8)
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True, prompt_logprobs=0)
LM = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    return _Store(tmp_path_factory, {"gemma3": ("gemma3", {}), "gemma4": ("gemma4", {})},
                  make_multimodal_checkpoint)


def _keys(adapter) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def _generate(art, adapter, prompt=PROMPT):
    """The base model's and `adapter`'s greedy outputs, one batch."""
    llm = LLM(art, backend="reference", num_kv_blocks=32, max_num_seqs=2)
    outs = llm.generate([prompt, prompt], GREEDY,
                        lora_request=[None, LoRARequest("ad", 1, str(adapter))])
    return llm, outs


def _assert_matches_peft(ck, adapter, outs):
    """Base and adapter outputs against transformers (+ peft) on the ConditionalGeneration
    model: greedy tokens equal, and each prompt token's logprob within 1e-4 of its
    log_softmax; the adapter does move the tokens."""
    want = [peft_greedy(ck, None, PROMPT, 6), peft_greedy(ck, adapter, PROMPT, 6)]
    assert [o.token_ids for o in outs] == want and want[0] != want[1]
    for out, ad in zip(outs, (None, adapter)):
        with torch.no_grad():
            ref = torch.log_softmax(peft_model(ck, ad)(torch.tensor([PROMPT])).logits[0]
                                    .double(), dim=-1)
        for pos in range(1, len(PROMPT)):
            e = out.prompt_logprobs[pos]
            assert e.token_id == PROMPT[pos]
            assert abs(e.logprob - ref[pos - 1, PROMPT[pos]].item()) < 1e-4, pos


@pytest.mark.parametrize("opt_level", [0, 2])
def test_gemma3_adapter_with_vision_tower_modules_matches_peft(mm, tmp_path, opt_level):
    """peft's target_modules=[q_proj, ..., down_proj] on Gemma3ForConditionalGeneration
    takes the SigLIP tower's q/k/v_proj too: braze maps the language model's modules and
    ignores the tower's, and its tokens equal peft's on the multimodal model."""
    ck = mm.checkpoint("gemma3")
    ad = make_adapter(ck, tmp_path / "ad", seed=3, r=4, scale=3.0)
    keys = _keys(ad)
    assert any(".language_model.layers." in k for k in keys)
    assert any(".vision_tower." in k for k in keys)
    llm, outs = _generate(mm.artifact("gemma3", opt_level=opt_level, **LORA), ad)
    _assert_matches_peft(ck, ad, outs)
    host = llm.engine.lora.read(LoRARequest("again", 2, str(ad)))
    assert host.ignored and all(m.startswith("model.vision_tower.") for m in host.ignored)
    assert all(m.startswith("model.layers.") for m in host.modules)


def test_gemma4_adapter_matches_peft(mm, tmp_path):
    """Gemma 4: the language model's linears by a regex, and the vision and audio towers'
    inner linears (peft cannot wrap their Gemma4ClippableLinear itself), ignored."""
    ck = mm.checkpoint("gemma4")
    ad = make_adapter(ck, tmp_path / "ad", seed=4, r=4, scale=3.0,
                      targets=rf".*language_model.*{LM}|.*(vision|audio)_tower.*\.q_proj\.linear")
    keys = _keys(ad)
    assert any(".vision_tower." in k for k in keys) and any(".audio_tower." in k for k in keys)
    _, outs = _generate(mm.artifact("gemma4", opt_level=2, **LORA), ad)
    _assert_matches_peft(ck, ad, outs)


def test_old_layout_names_map_too(mm, tmp_path):
    """Older transformers named the language model `language_model.model.` and the tower
    `vision_tower.` (peft's keys then read `base_model.model.language_model.model.layers...`):
    the same adapter under those names gives the same outputs, its tower still ignored."""
    from safetensors.torch import load_file, save_file
    ck = mm.checkpoint("gemma3")
    ad = make_adapter(ck, tmp_path / "ad", seed=5, r=4, scale=3.0)
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    tensors = load_file(str(ad / "adapter_model.safetensors"))
    renamed = {k.replace("base_model.model.model.language_model.",
                         "base_model.model.language_model.model.")
                .replace("base_model.model.model.vision_tower.",
                         "base_model.model.vision_tower."): v
               for k, v in tensors.items()}
    assert any(k.startswith("base_model.model.vision_tower.") for k in renamed)
    assert any(k.startswith("base_model.model.language_model.model.") for k in renamed)
    save_file(renamed, str(old / "adapter_model.safetensors"))
    art = mm.artifact("gemma3", opt_level=0, **LORA)
    (llm, got), want = _generate(art, old), _generate(art, ad)[1]
    host = llm.engine.lora.read(LoRARequest("again", 2, str(old)))
    assert host.ignored and all(m.startswith("vision_tower.") for m in host.ignored)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert want[0].token_ids != want[1].token_ids
    assert [e.logprob for e in got[1].prompt_logprobs[1:]] == \
        [e.logprob for e in want[1].prompt_logprobs[1:]]


def test_adapters_the_text_only_artifact_cannot_serve(mm, tmp_path):
    """Refused, one line each: an adapter for the vision tower alone (it would change
    nothing the artifact can run), a module under no prefix the artifact knows, and one
    module under both layouts' names."""
    ck = mm.checkpoint("gemma3")
    llm = LLM(mm.artifact("gemma3", opt_level=0, **LORA), backend="reference",
              num_kv_blocks=8, max_num_seqs=1)
    tower = make_adapter(ck, tmp_path / "tower", seed=6, r=4, targets=r".*vision_tower.*\.q_proj")
    with pytest.raises(LoRAError) as e:
        llm.engine.add_lora(LoRARequest("tower", 1, str(tower)))
    msg = str(e.value)
    assert "\n" not in msg and "text-only" in msg and "vision_tower" in msg
    assert "Gemma3ForConditionalGeneration" in msg
    stray = write_adapter(tmp_path / "stray", {
        "base_model.model.model.speech_tower.layers.0.q_proj.lora_A.weight": torch.ones(4, 64),
        "base_model.model.model.speech_tower.layers.0.q_proj.lora_B.weight": torch.ones(64, 4)})
    with pytest.raises(LoRAError, match=r"model\.speech_tower\.layers\.0\.q_proj"):
        llm.engine.add_lora(LoRARequest("stray", 2, str(stray)))
    q = "layers.0.self_attn.q_proj.lora_{}.weight"
    twice = write_adapter(tmp_path / "twice", {
        **{f"base_model.model.model.language_model.{q.format(w)}": torch.ones(4, 4) for w in "AB"},
        **{f"base_model.model.language_model.model.{q.format(w)}": torch.ones(4, 4) for w in "AB"}})
    with pytest.raises(LoRAError, match=r"holds module model\.layers\.0\.self_attn\.q_proj twice"):
        llm.engine.add_lora(LoRARequest("twice", 3, str(twice)))
    assert llm.engine.list_loras() == []



def test_an_artifact_without_the_prefixes_says_recompile(mm, tmp_path):
    """A manifest from before braze recorded adapter_prefixes: the multimodal adapter is
    refused with the advice to recompile, not read under the wrong names."""
    import copy
    import json

    from braze.runtime.lora import Contract, read_adapter
    ck = mm.checkpoint("gemma3")
    ad = make_adapter(ck, tmp_path / "ad", seed=9, r=4, targets=rf".*language_model.*{LM}")
    manifest = json.loads((mm.artifact("gemma3", opt_level=0, **LORA) / "manifest.json")
                          .read_text())
    assert read_adapter("ad", ad, Contract.from_manifest(manifest)).modules
    old = copy.deepcopy(manifest)
    del old["model"]["multimodal"]["adapter_prefixes"]
    with pytest.raises(LoRAError, match="compiled before braze mapped such adapters' names; "
                                        "recompile it"):
        read_adapter("ad", ad, Contract.from_manifest(old))


def test_load_lora_adapter_route(mm, tmp_path):
    """`braze serve`: /v1/load_lora_adapter takes the multimodal adapter (its tokens are
    peft's, and the server's log says what it ignored) and answers the tower-only one
    with a 400 that says the artifact is text-only."""
    pytest.importorskip("openai")
    from serve_helpers import Server
    ck = mm.checkpoint("gemma3")
    ad = make_adapter(ck, tmp_path / "ad", seed=7, r=4, scale=3.0)
    tower = make_adapter(ck, tmp_path / "tower", seed=8, r=4, targets=r".*vision_tower.*\.v_proj")
    server = Server(mm.artifact("gemma3", opt_level=0, **LORA), tmp_path,
                    "--allow-runtime-lora-updating")
    try:
        r = server.http.post("/v1/load_lora_adapter",
                             json={"lora_name": "ad", "lora_path": str(ad)})
        assert r.status_code == 200, r.text
        got = server.http.post("/v1/completions", json={
            "model": "ad", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}).json()
        assert got["choices"][0]["token_ids"] == peft_greedy(ck, ad, PROMPT, 6)
        r = server.http.post("/v1/load_lora_adapter",
                             json={"lora_name": "tower", "lora_path": str(tower)})
        assert r.status_code == 400
        assert "text-only" in r.json()["error"]["message"]
    finally:
        server.stop()
    assert "towers ignored" in server.stderr()


def test_interpreted_kernels_match_peft(mm, tmp_path):
    """Gemma 3's -O2 graph (sandwich norms, soft-capped attention) with the LoRA deltas,
    through the launch plans under the Triton interpreter: peft's greedy tokens, with the
    base model in the same batch."""
    ck = mm.checkpoint("gemma3")
    ad = make_adapter(ck, tmp_path / "ad", seed=3, r=4, scale=3.0)
    art = mm.artifact("gemma3", opt_level=2, max_num_tokens=8, max_num_seqs=2, **LORA)
    llm = LLM(art, backend="interpret", num_kv_blocks=4, max_num_seqs=2, buckets=[8])
    prompt = PROMPT[:4]
    outs = llm.generate([prompt, prompt], SamplingParams(max_tokens=2, ignore_eos=True),
                        lora_request=[LoRARequest("ad", 1, str(ad)), None])
    want = [peft_greedy(ck, ad, prompt, 2), peft_greedy(ck, None, prompt, 2)]
    assert [o.token_ids for o in outs] == want and want[0] != want[1]
    assert not any("lora" in f for f in llm.engine.runner.graphs.stats["extern_fallbacks"])
