"""GGUF checkpoints: `braze compile model.gguf` against transformers reading the same file.

Each case is a tiny random Llama, Qwen2 or Qwen3 written as llama.cpp writes it (tests/
gguf_helpers.py) in some quant types; braze and transformers both dequantize it with
gguf's own code, so in float32 their logits agree to 1e-4 and greedy tokens are equal.
The K- and I-quants have no Python quantizer: those tensors are random valid blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json

import pytest
import torch

import braze
from braze.ir.contract import SeqChunk
from braze.ir.errors import BrazeError

from cli_helpers import assert_one_line_error, run
from conftest import step_inputs, take_blocks
from gguf_helpers import bpe_vocab, hf_from_gguf, llama3_rope_factors, tiny_hf_model, write_gguf

PROMPT = [1, 17, 93, 4, 250, 66, 7, 31, 128, 9, 45, 200, 3, 77, 12, 190, 55, 8, 101, 42]

# name -> (arch, quant types in turn, tokenizer kind, model overrides)
CASES = {
    "llama-F32": ("llama", "F32", "spm", {}),
    "llama-F16-BF16-Q8_0": ("llama", "F16,BF16,Q8_0", "spm", {}),
    "llama-Q4_0-Q4_1": ("llama", "Q4_0,Q4_1", "spm", {}),
    "llama-Q4_K-Q6_K": ("llama", "Q4_K,Q6_K", "spm", dict(hidden_size=256, intermediate_size=256)),
    "qwen3-Q8_0-F16-tied": ("qwen3", "Q8_0,F16", "bpe", dict(tie_word_embeddings=True)),
    "qwen3-Q6_K-Q4_0": ("qwen3", "Q6_K,Q4_0", "bpe", dict(hidden_size=256, intermediate_size=256)),
    "qwen2-Q8_0-F16-tied": ("qwen2", "Q8_0,F16", "bpe", dict(tie_word_embeddings=True)),
    # llama.cpp's I-quants (imatrix files: IQ4_XS, IQ3_M, IQ2_M, ... as Ollama pulls them)
    "llama-IQ4_XS-IQ3_S-IQ2_XXS": ("llama", "IQ4_XS,IQ3_S,IQ2_XXS", "spm",
                                   dict(hidden_size=256, intermediate_size=256)),
    "qwen2-IQ4_NL-IQ3_XXS-IQ2_XS": ("qwen2", "IQ4_NL,IQ3_XXS,IQ2_XS", "bpe",
                                    dict(hidden_size=256, intermediate_size=256)),
    "qwen3-IQ2_S-IQ1_S-tied": ("qwen3", "IQ2_S,IQ1_S", "bpe",
                               dict(hidden_size=256, intermediate_size=256,
                                    tie_word_embeddings=True)),
}
VOCAB = {"spm": 320, "bpe": 256}


class _Files:
    def __init__(self, factory):
        self.factory = factory
        self.ggufs, self.artifacts, self.logs, self.hf, self.written = {}, {}, {}, {}, {}

    def gguf(self, case):
        if case not in self.ggufs:
            arch, qtype, tok, overrides = CASES[case]
            model = self.written[case] = tiny_hf_model(arch, VOCAB[tok], **overrides)
            self.ggufs[case] = write_gguf(model, self.factory.mktemp(case) / "model.gguf",
                                          qtype, tokenizer=tok)
        return self.ggufs[case]

    def artifact(self, case):
        if case not in self.artifacts:
            out = self.factory.mktemp(case + "-art") / "a.braze"
            lines = []
            braze.compile(self.gguf(case), out, opt_level=0, targets="", dtype="float32",
                          log=lines.append)
            self.artifacts[case], self.logs[case] = out, lines
        return self.artifacts[case]

    def transformers(self, case):
        if case not in self.hf:
            self.hf[case] = hf_from_gguf(self.gguf(case))
        return self.hf[case]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _Files(tmp_path_factory)


def _prefill_logits(artifact, prompt):
    from braze.runtime import Executor, open_artifact
    ex = Executor(open_artifact(artifact), backend="reference", num_blocks=8)
    return ex.run(step_inputs(ex, [SeqChunk(prompt, 0, take_blocks(ex, 2))]))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_reading_the_same_gguf(files, case):
    vocab = VOCAB[CASES[case][2]]
    prompt = [t % vocab for t in PROMPT]
    got = _prefill_logits(files.artifact(case), prompt)
    model, _ = files.transformers(case)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_f32_gguf_gives_the_logits_of_the_model_it_was_written_from(files):
    """Independent of transformers' GGUF reader: llama.cpp's Q/K row permutation is undone."""
    prompt = [t % 320 for t in PROMPT]
    got = _prefill_logits(files.artifact("llama-F32"), prompt)
    with torch.no_grad():
        expected = files.written["llama-F32"](torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama-Q4_0-Q4_1", "qwen3-Q8_0-F16-tied", "qwen2-Q8_0-F16-tied"])
def test_greedy_tokens_match_transformers(files, case):
    from braze.runtime.engine import Engine
    from braze.runtime import open_artifact
    from braze.runtime.sampler import SamplingParams
    eng = Engine(open_artifact(files.artifact(case)), backend="reference", num_kv_blocks=16,
                 max_num_seqs=2)
    prompt = PROMPT[:11]
    eng.add_request("r", prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    ours = eng.run_to_completion()["r"].token_ids
    model, _ = files.transformers(case)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()


TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello the world", "  two  spaces",
         "A compiler, in one language: 9:45!", ""]


@pytest.mark.parametrize("case", ["llama-F32", "qwen3-Q8_0-F16-tied"])
def test_tokenizer_encodes_like_transformers(files, case):
    """The artifact's tokenizer (tokenizers only, as the runtime loads it) against
    transformers' AutoTokenizer.from_pretrained(dir, gguf_file=...)."""
    from braze.runtime.tokenizer import Tokenizer
    ours = Tokenizer(files.artifact(case) / "tokenizer")
    _, theirs = files.transformers(case)
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    ids = theirs("hello the world")["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_chat_template_and_stop_ids_come_from_the_gguf(files):
    from gguf_helpers import QWEN_CHAT_TEMPLATE
    art = files.artifact("qwen3-Q8_0-F16-tied")
    assert (art / "tokenizer" / "chat_template.jinja").read_text() == QWEN_CHAT_TEMPLATE
    manifest = json.loads((art / "manifest.json").read_text())
    tokens = bpe_vocab(256)[0]
    assert tokens.index("<|im_end|>") in manifest["model"]["eos_token_ids"]


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("arch, specials, eos, bos, stops", [
    # Qwen2.5-Instruct: eos <|im_end|>; its generation_config.json also stops on <|endoftext|>
    ("qwen2", QWEN_SPECIALS, "<|im_end|>", "<|endoftext|>", {"<|im_end|>", "<|endoftext|>"}),
    # Llama 3 Instruct as early converters wrote it: eos <|end_of_text|> and no eot id, yet
    # every chat turn ends with <|eot_id|> (its generation_config.json lists both)
    ("llama", ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"), "<|end_of_text|>",
     "<|begin_of_text|>", {"<|end_of_text|>", "<|eot_id|>"}),
])
def test_stop_ids_are_the_end_of_turn_tokens_llama_cpp_stops_on(tmp_path, arch, specials, eos,
                                                                 bos, stops):
    """llama.cpp ends generation on every token spelled as an end of turn, not only on
    tokenizer.ggml.eos_token_id: an artifact that stopped only there would run a chat reply
    on past its end."""
    tokens, merges, types = bpe_vocab(256)
    rename = dict(zip(QWEN_SPECIALS, specials))
    tokens = [rename.get(t, t) for t in tokens]
    path = write_gguf(tiny_hf_model(arch, 256), tmp_path / "m.gguf", "Q8_0",
                      vocab=(tokens, merges, types), eos=eos, bos=bos)
    out = tmp_path / "a.braze"
    braze.compile(path, out, opt_level=0, targets="")
    manifest = json.loads((out / "manifest.json").read_text())
    ids = manifest["model"]["eos_token_ids"]
    assert ids[0] == tokens.index(eos)
    assert sorted(ids) == sorted(tokens.index(t) for t in stops)


def test_manifest_records_the_gguf_source(files):
    path = files.gguf("llama-Q4_0-Q4_1")
    manifest = json.loads((files.artifact("llama-Q4_0-Q4_1") / "manifest.json").read_text())
    src = manifest["model"]["source"]
    assert src["format"] == "gguf" and src["file"] == "model.gguf"
    assert src["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert src["gguf_architecture"] == "llama"
    assert set(src["tensor_types"]) == {"Q4_0", "Q4_1", "F32"}
    assert manifest["model"]["architecture"] == "LlamaForCausalLM"


def test_dequantizing_reports_progress(files):
    files.artifact("llama-Q4_K-Q6_K")
    log = "\n".join(files.logs["llama-Q4_K-Q6_K"])
    assert "Q4_K x" in log and "Q6_K x" in log
    assert "dequantized 21/21 GGUF tensors" in log
    # hashing the whole file (tens of seconds for a large one) is said before it starts
    lines = files.logs["llama-Q4_K-Q6_K"]
    start = next(i for i, line in enumerate(lines) if line.startswith("hashing "))
    assert "GiB" in lines[start] and any(line.startswith("hashed ") for line in lines[start:])


def test_default_dtype_follows_the_file(tmp_path):
    """Without --dtype: float32 for an all-F32 file, float16 for a quantized one."""
    from braze.frontend.gguf import GGUFSource
    model = tiny_hf_model("llama", 320)
    for qtype, dtype in (("F32", "float32"), ("Q8_0", "float16"), ("BF16", "bfloat16")):
        src = GGUFSource(write_gguf(model, tmp_path / f"{qtype}.gguf", qtype, tokenizer="spm"))
        try:
            assert src.default_dtype() == dtype
        finally:
            src.close()


def test_llama3_rope_freqs_tensor_scales_rope(tmp_path):
    """Llama 3.1+ GGUFs carry RoPE scaling as a `rope_freqs` tensor, which transformers
    ignores: braze applies it, so it matches the original (HF) model's llama3 RoPE."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    model = tiny_hf_model("llama", 320, rope_parameters=rope)
    path = write_gguf(model, tmp_path / "m.gguf", "F32", tokenizer="spm",
                      rope_freqs=llama3_rope_factors(rope, 16))
    out = tmp_path / "a.braze"
    braze.compile(path, out, opt_level=0, targets="")
    prompt = [t % 320 for t in PROMPT]
    got = _prefill_logits(out, prompt)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keys", [
    {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
    {"llama.rope.scaling.factor": 4.0},          # llama.cpp: a factor without a type is linear
    {"llama.rope.scale_linear": 4.0},            # the key older converters wrote
], ids=["type-and-factor", "factor-only", "scale_linear"])
def test_linear_rope_scaling_keys_are_read(tmp_path, keys):
    """llama.cpp's `llama.rope.scaling.*` keys (which transformers' GGUF reader skips) give
    the RoPE of the model the file was written from."""
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    model = tiny_hf_model("llama", 320, rope_parameters=rope)
    path = write_gguf(model, tmp_path / "m.gguf", "F32", tokenizer="spm", extra_kv=keys)
    out = tmp_path / "a.braze"
    braze.compile(path, out, opt_level=0, targets="")
    prompt = [t % 320 for t in PROMPT]
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(_prefill_logits(out, prompt), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vocab_key", [True, False])
def test_a_gguf_without_a_tokenizer_compiles_for_token_ids(tmp_path, monkeypatch, vocab_key):
    """Without `llama.vocab_size` too, the embedding's rows give the vocabulary size."""
    import gguf
    if not vocab_key:
        monkeypatch.setattr(gguf.GGUFWriter, "add_vocab_size", lambda self, n: None)
    model = tiny_hf_model("llama", 320)
    path = write_gguf(model, tmp_path / "m.gguf", "F32", tokenizer=None)
    out, lines = tmp_path / "a.braze", []
    braze.compile(path, out, opt_level=0, targets="", log=lines.append)
    assert any("the GGUF file has no tokenizer" in ln for ln in lines)
    assert not (out / "tokenizer" / "tokenizer.json").exists()
    with torch.no_grad():
        expected = model(torch.tensor([[1, 2, 3]])).logits[0]
    torch.testing.assert_close(_prefill_logits(out, [1, 2, 3]), expected, atol=1e-4, rtol=1e-4)


def test_a_llama_gguf_named_mistral_is_read_as_transformers_reads_it(tmp_path):
    """llama.cpp writes Mistral as architecture llama; depending on its version transformers
    reads one named mistral as mistral or as llama: braze follows the installed one."""
    model = tiny_hf_model("llama", 320)
    path = write_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer="spm", name="mistral-tiny")
    out = tmp_path / "a.braze"
    braze.compile(path, out, opt_level=0, targets="", dtype="float32")
    manifest = json.loads((out / "manifest.json").read_text())
    theirs, _ = hf_from_gguf(path)
    assert manifest["model"]["architecture"] == type(theirs).__name__
    prompt = [t % 320 for t in PROMPT]
    with torch.no_grad():
        expected = theirs(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(_prefill_logits(out, prompt), expected, atol=1e-4, rtol=1e-4)


def test_cli_compiles_a_gguf_and_generates(tmp_path):
    model = tiny_hf_model("qwen3", 256)
    path = write_gguf(model, tmp_path / "m.gguf", "Q8_0")
    out = tmp_path / "a.braze"
    code, _, err = run("compile", path, "-o", out, "--opt-level", "0", "--targets", "")
    assert code == 0, err
    assert "GGUF m.gguf: qwen3" in err and "dequantized" in err
    code, stdout, err = run("generate", out, "--prompt", "hello", "--max-tokens", "3", "--json",
                            "--backend", "reference")
    assert code == 0, err
    assert len(json.loads(stdout)["token_ids"]) == 3
    code, stdout, err = run("inspect", out)
    assert code == 0, err
    assert "source     gguf m.gguf (qwen3; Q8_0 x" in stdout


def test_inspect_says_the_quant_mix_the_stop_tokens_and_the_chat_template(tmp_path):
    """What a llama.cpp user checks first (`ollama show`): the file's quantization by the
    name they know it (Q4_K_M), which tokens end generation, and whether a chat template
    came along; checked against gguf's own reading of the file."""
    import gguf
    path = write_gguf(tiny_hf_model("qwen3", 256, hidden_size=256, intermediate_size=256),
                      tmp_path / "m.gguf", "Q4_K,Q6_K", file_type="MOSTLY_Q4_K_M")
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    eos = reader.fields["tokenizer.ggml.eos_token_id"].contents()
    mix = gguf.LlamaFileType(reader.fields["general.file_type"].contents()).name
    out = tmp_path / "a.braze"
    code, _, err = run("compile", path, "-o", out, "--opt-level", "0", "--targets", "")
    assert code == 0, err
    code, stdout, err = run("inspect", out)
    assert code == 0, err
    lines = {ln.split(None, 1)[0]: ln for ln in stdout.splitlines() if ln.strip()}
    assert f"; file type {mix.removeprefix('MOSTLY_')})" in lines["source"]
    assert "chat template" in lines["weights"]
    assert f"{eos} {tokens[eos]}" in lines["stops"]
    code, stdout, _ = run("inspect", out, "--json")
    summary = json.loads(stdout)
    assert summary["chat_template"] is True
    assert [eos, tokens[eos]] in summary["stop_tokens"]


def test_compile_help_says_model_may_be_a_gguf_file():
    """...and names every GGUF architecture braze reads."""
    from braze.frontend.gguf import ARCHITECTURES
    code, stdout, _ = run("compile", "--help")
    assert code == 0 and ".gguf file" in stdout
    help_text = " ".join(stdout.split())
    for arch in ARCHITECTURES:
        assert f"{arch}," in help_text or f"{arch};" in help_text, arch


def test_unsupported_architecture_is_one_line_naming_it(tmp_path):
    path = write_gguf(tiny_hf_model("llama", 320), tmp_path / "m.gguf", "F32",
                      tokenizer="spm", arch="falcon")
    code, _, err = run("compile", path, "-o", tmp_path / "a.braze")
    assert_one_line_error(code, err, "GGUF architecture 'falcon' is not supported", "llama, qwen2, qwen3")


def test_unsupported_quant_type_is_one_line_naming_it(tmp_path):
    path = write_gguf(tiny_hf_model("llama", 320), tmp_path / "m.gguf", "Q8_0",
                      tokenizer="spm", tensor_types={"blk.1.ffn_up.weight": "Q8_1"})
    code, _, err = run("compile", path, "-o", tmp_path / "a.braze")
    assert_one_line_error(code, err, "blk.1.ffn_up.weight", "Q8_1", "Q4_K", "IQ4_XS")


@pytest.mark.parametrize("kv, needle", [
    ({"split.count": 3}, "split GGUF; merge the parts first"),
    ({"llama.rope.scaling.type": "longrope"}, "RoPE scaling type 'longrope' is not supported"),
])
def test_split_files_and_unknown_rope_scaling_are_refused(tmp_path, kv, needle):
    path = write_gguf(tiny_hf_model("llama", 320), tmp_path / "m.gguf", "F16", tokenizer="spm",
                      extra_kv=kv)
    with pytest.raises(BrazeError, match=needle):
        braze.compile(path, tmp_path / "a.braze")
    assert not (tmp_path / "a.braze").exists()


def test_a_directory_of_gguf_files_names_them(tmp_path):
    """A downloaded GGUF repository is a directory of quantizations with no config.json:
    the error says which files it could compile."""
    model = tiny_hf_model("llama", 320)
    repo = tmp_path / "tiny-GGUF"
    repo.mkdir()
    for q in ("Q8_0", "Q4_0"):
        write_gguf(model, repo / f"tiny-{q}.gguf", q, tokenizer="spm")
    code, _, err = run("compile", repo, "-o", tmp_path / "a.braze")
    assert_one_line_error(code, err, "no config.json", "tiny-Q4_0.gguf", "tiny-Q8_0.gguf")


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(BrazeError, match="not a readable GGUF file"):
        with contextlib.redirect_stderr(io.StringIO()):
            braze.compile(bad, tmp_path / "a.braze")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(BrazeError, match="is a file; expected a Hugging Face model directory "
                                         "or a .gguf file"):
        braze.compile(other, tmp_path / "b.braze")



def test_each_part_of_a_split_gguf_is_refused_naming_that_part(tmp_path):
    """llama-gguf-split writes the metadata into the first part only: the second part must
    not read as an unsupported architecture '?', nor call itself part 1."""
    first = write_gguf(tiny_hf_model("llama", 320), tmp_path / "model.gguf", "F16",
                       tokenizer="spm", split_max_tensors=12)
    assert first.name == "model-00001-of-00002.gguf"
    for part, path in enumerate(sorted(tmp_path.glob("model-*-of-*.gguf")), 1):
        code, _, err = run("compile", path, "-o", tmp_path / "a.braze")
        assert_one_line_error(code, err, f"part {part} of a 2-way split GGUF",
                              "llama-gguf-split --merge model-00001-of-00002.gguf")
    assert not (tmp_path / "a.braze").exists()


@pytest.mark.parametrize("kv_heads", [[2, 1], [2, 2]])
def test_per_layer_kv_head_counts_are_one_line_naming_the_key(tmp_path, monkeypatch, kv_heads):
    """llama.cpp writes attention.head_count_kv as a per-layer array for some models;
    transformers' config rejects a list there with a traceback."""
    import gguf
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count_kv", lambda self, n: self.add_array(
        "llama.attention.head_count_kv", kv_heads))
    path = write_gguf(tiny_hf_model("llama", 320), tmp_path / "m.gguf", "F16", tokenizer="spm")
    code, _, err = run("compile", path, "-o", tmp_path / "a.braze")
    assert_one_line_error(code, err, "llama.attention.head_count_kv", str(kv_heads))


def _gguf_roundtrip(model, qtype: str):
    """`model` with each weight as gguf's own quantizer and dequantizer give it back (the
    values a file written in `qtype` holds: write_gguf keeps 1-D and odd-width ones F32)."""
    import copy

    import gguf
    q = gguf.GGMLQuantizationType[qtype]
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() >= 2 and p.shape[-1] % gguf.GGML_QUANT_SIZES[q][0] == 0:
                w = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q), q)
                p.copy_(torch.from_numpy(w.reshape(p.shape)))
    return out


def _assert_compiles_to_its_source(model, path, tmp_path, qtype: str, vocab: int) -> None:
    """The GGUF at `path`, written from `model` in `qtype`, compiles (float32) to `model`'s
    architecture and gives its logits, its weights through gguf's quantizer and back."""
    out = tmp_path / "a.braze"
    braze.compile(path, out, opt_level=0, targets="", dtype="float32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == type(model).__name__
    prompt = [t % vocab for t in PROMPT]
    with torch.no_grad():
        expected = _gguf_roundtrip(model, qtype)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(_prefill_logits(out, prompt), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, tok, qtype", [("mixtral", "spm", "F32"), ("mixtral", "spm", "Q8_0"),
                                             ("qwen3_moe", "bpe", "F32"),
                                             ("qwen3_moe", "bpe", "Q8_0")])
def test_moe_ggufs_give_the_logits_of_the_model_they_were_written_from(tmp_path, arch, tok, qtype):
    """Mixtral (llama.cpp's architecture 'llama' with llama.expert_count) and Qwen3-MoE,
    whose experts llama.cpp stacks per projection (blk.N.ffn_gate_exps.weight). transformers
    reads the Mixtral as a dense Llama with random MLPs, and the Qwen3-MoE with its class's
    expert width, so the reference is the written model, its weights through gguf's own
    quantizer and dequantizer."""
    vocab = VOCAB[tok]
    model = tiny_hf_model(arch, vocab)
    path = write_gguf(model, tmp_path / "m.gguf", qtype, tokenizer=tok)
    _assert_compiles_to_its_source(model, path, tmp_path, qtype, vocab)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_phi3_gguf_gives_the_logits_of_the_model_it_was_written_from(tmp_path, partial):
    """Phi-3 / Phi-4-mini GGUFs: fused attn_qkv and ffn_up tensors, and Phi-4-mini's partial
    rotary stated as phi3.rope.dimension_count (transformers' reader skips it, and its
    class default pad id 32000 is outside a small vocabulary)."""
    model = tiny_hf_model("phi3", 320, partial_rotary_factor=partial)
    path = write_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer="spm")
    _assert_compiles_to_its_source(model, path, tmp_path, "Q8_0", 320)


@pytest.mark.parametrize("long", [False, True])
def test_phi3_longrope_factor_tensors_are_read(tmp_path, long):
    """Phi-3-128k GGUFs keep longrope's factors as tensors (rope_factors_long/short), which
    transformers' reader drops: without them the model runs on plain RoPE. Checked for a
    short-context artifact and one whose max_model_len passes the original context."""
    from braze.runtime import Executor, open_artifact
    head = 16
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
            "short_factor": [1.0 + 0.3 * i for i in range(head // 2)],
            "long_factor": [2.0 + 0.5 * i for i in range(head // 2)]}
    model = tiny_hf_model("phi3", 320, rope_parameters=rope)
    path = write_gguf(model, tmp_path / "m.gguf", "F32", tokenizer="spm")
    out = tmp_path / "a.braze"
    braze.compile(path, out, opt_level=0, targets="", dtype="float32",
                  max_model_len=128 if long else 32)
    prompt = [t % 320 for t in PROMPT]
    ex = Executor(open_artifact(out), backend="reference", num_blocks=8)
    got = ex.run(step_inputs(ex, [SeqChunk(prompt, 0, take_blocks(ex, 2))]))
    # transformers picks the factors by the sequence's length: a long one for the long set
    full = torch.tensor([prompt + [5] * (40 if long else 0)])
    with torch.no_grad():
        expected = model(full).logits[0, :len(prompt)]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_mistral_gguf_attends_to_the_whole_context(tmp_path):
    """transformers reads a llama GGUF whose general.name is "mistral" as a Mistral, with
    MistralConfig's default 4096-token sliding window, which the file does not state:
    llama.cpp (and Mistral v0.2+ itself) attend to the whole context, so tokens past 4096
    must see the first ones."""
    from braze.runtime import Executor, open_artifact
    n = 4096 + 64
    model = tiny_hf_model("llama", 320, max_position_embeddings=n)
    path = write_gguf(model, tmp_path / "m.gguf", "F32", tokenizer="spm", name="mistral")
    out = tmp_path / "a.braze"
    braze.compile(path, out, opt_level=0, targets="", dtype="float32")
    prompt = [(7 * i) % 320 for i in range(n)]
    ex = Executor(open_artifact(out), backend="reference", num_blocks=n // 16 + 1)
    got = ex.run(step_inputs(ex, [SeqChunk(prompt, 0, take_blocks(ex, n // 16))]))
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got[-64:], expected[-64:], atol=1e-4, rtol=1e-4)


def test_a_truncated_gguf_says_it_may_be_an_interrupted_download(tmp_path):
    whole = write_gguf(tiny_hf_model("llama", 320), tmp_path / "m.gguf", "Q8_0", tokenizer="spm")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-1000])
    code, _, err = run("compile", cut, "-o", tmp_path / "a.braze")
    assert_one_line_error(code, err, "cut.gguf: not a readable GGUF file", "truncated",
                          f"{cut.stat().st_size} bytes")
    assert not (tmp_path / "a.braze").exists()


@pytest.mark.parametrize("scaled", [False, True])
def test_gemma3_gguf_gives_the_logits_of_the_model_it_was_written_from(tmp_path, scaled):
    """Gemma 3 GGUFs: llama.cpp stores the (1 + w) norms as 1 + w, keeps RoPE scaling for
    the global layers only (Gemma 3 4B+: linear, factor 8), and fixes the query scale
    (1/sqrt(head_dim)) rather than writing it: transformers' reader leaves the class default
    query_pre_attn_scalar 256. Six layers: five sliding (window 4) and one global."""
    rope = None
    if scaled:
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                   "factor": 8.0}}
    model = tiny_hf_model("gemma3", 320, **({"rope_parameters": rope} if rope else {}))
    kv = {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0} if scaled else {}
    path = write_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer="spm", extra_kv=kv)
    _assert_compiles_to_its_source(model, path, tmp_path, "Q8_0", 320)


def test_a_quantized_gemma3_gguf_compiles_by_default_in_a_dtype_its_activations_fit(tmp_path):
    """Gemma's hidden states pass float16's 65504 (here: embedding entries ~1e4 times
    sqrt(hidden)); the default for a quantized file, float16, made them inf and the logits
    NaN. Without --dtype a Gemma 3 GGUF compiles to bfloat16, whose top tokens are the
    float32 model's."""
    model = tiny_hf_model("gemma3", 320)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e5)
    path = write_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer="spm")
    out = tmp_path / "a.braze"
    braze.compile(path, out, opt_level=0, targets="")
    assert json.loads((out / "manifest.json").read_text())["model"]["dtype"] == "bf16"
    prompt = [t % 320 for t in PROMPT]
    got = _prefill_logits(out, prompt).float()
    assert torch.isfinite(got).all()
    with torch.no_grad():
        expected = _gguf_roundtrip(model, "Q8_0")(torch.tensor([prompt])).logits[0]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
