"""Incremental detokenisation and stop strings (runtime/detokenizer.py), checked against
decoding all tokens at once, with three tokenizers: the tiny ASCII byte-level BPE
(braze/tiny.py), a byte-level BPE trained here on text with é, 中文 and emoji, and a
Llama-2-style tokenizer (byte fallback, leading-space stripping decoder)."""

from __future__ import annotations

import pytest
from braze.runtime.detokenizer import IncrementalDetokenizer
from braze.runtime.tokenizer import Tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braze.tiny import make_tokenizer

HYP = settings(max_examples=80, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FFFD = "\ufffd"

_MULTIBYTE_TEXT = """\
Café crème brûlée, naïve façade, déjà vu. Élodie a mangé une crêpe à l'été.
中文字符测试，你好世界。我们在这里测试分词器的增量解码。中文和English混合。
Emoji time: 🙂🚀🎉👍🏽 and 🇫🇷 flags, ☕ coffee, ✨ sparkles — “quotes” … done.
The quick brown fox jumps over the lazy dog; naïve café 中文 🙂 again and again.
"""


def _byte_level_bpe(directory) -> Tokenizer:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_MULTIBYTE_TEXT.splitlines(keepends=True), trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    return Tokenizer(directory)


def _sentencepiece_style(directory) -> Tokenizer:
    """Llama-2 layout: '▁' for spaces, <0xNN> byte fallback, the first space stripped on decode."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in ["▁"] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.!?'"):
        vocab[c] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("e", "r"), ("▁", "c")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = HF(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                        fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    return Tokenizer(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tiny-tok")
    make_tokenizer(d)
    return Tokenizer(d)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    return _byte_level_bpe(tmp_path_factory.mktemp("bpe-tok"))


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    return _sentencepiece_style(tmp_path_factory.mktemp("spm-tok"))


def _stream(tok, prompt, out, stop=(), sizes=(1,), skip_special_tokens=True, include=False):
    """Feed `out` in chunks of the given sizes (cycled). Returns (detok, deltas, hits, texts):
    the output_delta of every step plus the final one, update()'s return values, and
    .text after every step."""
    dt = IncrementalDetokenizer(tok, prompt, stop=stop, skip_special_tokens=skip_special_tokens,
                                include_stop=include)
    deltas, hits, texts = [], [], []
    i = k = 0
    while i < len(out):
        n = max(1, sizes[k % len(sizes)])
        hits.append(dt.update(out[i:i + n]))
        deltas.append(dt.output_delta(False))
        texts.append(dt.text)
        i, k = i + n, k + 1
    deltas.append(dt.output_delta(True))
    return dt, deltas, hits, texts


def _check_stream(dt, deltas, texts, expected):
    assert dt.text == expected
    assert "".join(deltas) == expected
    for t in texts:                                  # the text only ever grows
        assert expected.startswith(t)
    if FFFD not in expected:
        assert not any(FFFD in d for d in deltas)


_sizes = st.lists(st.integers(1, 4), min_size=1, max_size=6)


# ------------------------------------------------------------ text equals decode(all)

def test_the_multibyte_tokenizer_splits_characters_across_tokens(bpe):
    """Precondition for the tests below: some characters really are cut by token boundaries."""
    ids = bpe.encode(_MULTIBYTE_TEXT)
    assert bpe.decode(ids) == _MULTIBYTE_TEXT
    assert sum(FFFD in bpe.decode([t]) for t in ids) > 10


@HYP
@given(prompt=st.text(alphabet="The fox, 12!\n", max_size=20),
       out=st.text(alphabet="The quick brown fox jumps over the lazy dog. \n\"!9:45", max_size=80),
       sizes=_sizes)
def test_tiny_tokenizer_stream_equals_decode(tiny, prompt, out, sizes):
    p, o = tiny.encode(prompt), tiny.encode(out)[1:]          # [1:]: drop the <s> encode adds
    dt, deltas, _, texts = _stream(tiny, p, o, sizes=sizes)
    _check_stream(dt, deltas, texts, tiny.decode(o))
    assert dt.text == out


_ML_ALPHABET = list("ab é中文🙂👍🏽çü\n.") + ["🇫🇷", "字符", "—"]


@HYP
@given(prompt=st.lists(st.sampled_from(_ML_ALPHABET), max_size=8).map("".join),
       out=st.lists(st.sampled_from(_ML_ALPHABET), max_size=40).map("".join), sizes=_sizes)
def test_multibyte_stream_equals_decode_and_never_shows_fffd(bpe, prompt, out, sizes):
    p, o = bpe.encode(prompt), bpe.encode(out)
    dt, deltas, _, texts = _stream(bpe, p, o, sizes=sizes)
    _check_stream(dt, deltas, texts, out)
    assert not any(FFFD in t for t in texts)


@HYP
@given(prompt=st.lists(st.sampled_from(_ML_ALPHABET), max_size=8).map("".join),
       out=st.lists(st.integers(0, 419), max_size=60), sizes=_sizes)
def test_arbitrary_token_ids_stream_equals_decode(bpe, prompt, out, sizes):
    """Any ids (invalid UTF-8 included): the streamed text is exactly decode(all)."""
    dt, deltas, _, texts = _stream(bpe, bpe.encode(prompt), out, sizes=sizes)
    _check_stream(dt, deltas, texts, bpe.decode(out))


@HYP
@given(prompt=st.lists(st.sampled_from(_ML_ALPHABET + ["the ", "cat "]), max_size=8).map("".join),
       out=st.lists(st.sampled_from(_ML_ALPHABET + ["the ", "cat "]), max_size=30).map("".join),
       bos=st.booleans(), sizes=_sizes)
def test_sentencepiece_style_stream_equals_what_the_output_adds(spm, prompt, out, bos, sizes):
    """With a decoder that strips the text's first space, the output's text is what it
    adds to the prompt's text (decoding it alone would lose its leading space)."""
    p = ([1] if bos else []) + spm.encode(prompt)
    o = spm.encode(out)
    full, head = spm.decode(p + o), spm.decode(p)
    assert full.startswith(head)
    dt, deltas, _, texts = _stream(spm, p, o, sizes=sizes)
    _check_stream(dt, deltas, texts, full[len(head):])


def test_byte_fallback_character_waits_for_its_last_byte(spm):
    ids = spm.encode("a 中")                        # ... <0xE4> <0xB8> <0xAD>
    dt = IncrementalDetokenizer(spm, [1])
    got = []
    for t in ids:
        dt.update([t])
        got.append(dt.output_delta(False))
    assert got[-3:] == ["", "", " 中"] or got[-4:] == [" ", "", "", "中"]
    assert "".join(got) == "a 中"


def test_long_output_matches_decode(tiny):
    text = ("The quick brown fox jumps over the lazy dog. " * 40).strip()
    ids = tiny.encode(text)
    dt, deltas, _, _ = _stream(tiny, ids[:3], ids[3:])
    assert dt.text == tiny.decode(ids[3:]) and "".join(deltas) == dt.text
    assert dt.num_tokens == len(ids) - 3


def test_special_tokens_are_skipped_or_kept(tiny):
    ids = tiny.encode("Hello there")[1:] + [2]                # ... </s>
    assert _stream(tiny, [1], ids)[0].text == "Hello there"
    assert _stream(tiny, [1], ids, skip_special_tokens=False)[0].text == "Hello there</s>"


def test_unfinished_character_comes_out_at_finish(bpe):
    ids = bpe.encode("ok 🦀")                           # not in the training text: split
    cut = next(i for i in range(len(ids), 0, -1) if bpe.decode(ids[:i]).endswith(FFFD))
    dt = IncrementalDetokenizer(bpe, [])
    dt.update(ids[:cut])
    assert dt.output_delta(False) == "ok "                     # the cut emoji waits
    assert dt.output_delta(True) == bpe.decode(ids[:cut])[len("ok "):]
    assert dt.text == bpe.decode(ids[:cut])
    assert dt.update(ids[cut:]) is None and dt.text == bpe.decode(ids[:cut])


# ------------------------------------------------------------------------ stop strings

def _feed_text(tok, text, stop, sizes=(1,)):
    ids = tok.encode(text)[1:]
    return _stream(tok, [1], ids, stop=stop, sizes=sizes)


def test_stop_string_truncates_and_ends_the_text(tiny):
    dt, deltas, hits, _ = _feed_text(tiny, "Hello world, goodbye", ["world"])
    assert dt.text == "Hello " and "".join(deltas) == "Hello "
    assert [h for h in hits if h] == ["world"] and dt.stop_reason == "world" and dt.stopped
    assert dt.update(tiny.encode(" more")[1:]) is None
    assert dt.text == "Hello " and dt.output_delta(True) == ""


def test_stop_string_split_across_tokens(tiny):
    text = "The quick brown fox jumps"
    ids = tiny.encode(text)[1:]
    pieces = [tiny.decode([t]) for t in ids]
    stop = "k bro"
    assert not any(stop in p for p in pieces)                 # no single token holds it
    dt, deltas, hits, _ = _stream(tiny, [1], ids, stop=[stop])
    assert dt.text == "The quic" and "".join(deltas) == "The quic"
    assert hits.count(stop) == 1


def test_stop_string_inside_a_multibyte_character_run(bpe):
    out = "café 中文字符 🙂 end"
    ids = bpe.encode(out)
    dt, deltas, _, _ = _stream(bpe, [], ids, stop=["字符"])
    assert dt.text == "café 中文" and "".join(deltas) == "café 中文"
    dt, deltas, _, _ = _stream(bpe, [], ids, stop=["🙂"], sizes=(3,))
    assert dt.text == "café 中文字符 " and dt.stop_reason == "🙂"


def test_the_earliest_stop_string_wins(tiny):
    for stop in (["fox", "quick"], ["quick", "fox"]):
        for sizes in ((1,), (100,)):
            dt, _, _, _ = _feed_text(tiny, "The quick brown fox", stop, sizes)
            assert (dt.text, dt.stop_reason) == ("The ", "quick")
    # the one that completes first, even when a longer one started earlier
    dt, _, _, _ = _feed_text(tiny, "The quick brown fox", ["quick brown fox", "ick"], (100,))
    assert (dt.text, dt.stop_reason) == ("The qu", "ick")


def test_a_stop_string_in_the_prompt_does_not_count(tiny):
    p = tiny.encode("Say world")
    dt, _, _, _ = _stream(tiny, p, tiny.encode(" and world peace")[1:], stop=["world"])
    assert dt.text == " and "


def test_partial_stop_string_is_withheld_then_released(tiny):
    dt = IncrementalDetokenizer(tiny, [1], stop=["fox!", "zz"])
    dt.update(tiny.encode("the fo")[1:])
    assert dt.output_delta(False) == "the "                   # "fo" could start "fox!"
    assert dt.output_delta(False) == ""
    assert dt.output_delta(True) == "fo" and dt.text == "the fo"
    dt = IncrementalDetokenizer(tiny, [1], stop=["fox!"])
    dt.update(tiny.encode("the fox")[1:])
    assert dt.output_delta(False) == "the "
    dt.update(tiny.encode(" ran")[1:])                        # "fox " is not "fox!"
    assert dt.output_delta(False) == "fox ran"


def _reference_stop(text: str, stops: list[str], include: bool = False):
    """The stop string that completes first as the text grows (longest on a tie), and the
    text before it (through it, with `include`: include_stop_str_in_output)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0:
            key = (i + len(s), -len(s), i, s)
            best = key if best is None or key < best else best
    if best is None:
        return text, None
    return text[:best[2] + (len(best[3]) if include else 0)], best[3]


@HYP
@given(out=st.text(alphabet="abc ", max_size=60),
       stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=5), max_size=4),
       sizes=_sizes, include=st.booleans())
def test_stop_strings_match_a_reference(tiny, out, stops, sizes, include):
    ids = tiny.encode(out)[1:]
    dt, deltas, hits, texts = _stream(tiny, [1], ids, stop=stops, sizes=sizes, include=include)
    text, reason = _reference_stop(out, stops, include)
    assert (dt.text, dt.stop_reason) == (text, reason)
    assert "".join(deltas) == text
    assert [h for h in hits if h is not None] == ([reason] if reason else [])
    assert all(out.startswith(t) for t in texts)
    released = ""
    for d in deltas:                        # what was handed out is never taken back
        released += d
        assert text.startswith(released)


@HYP
@given(out=st.lists(st.sampled_from(_ML_ALPHABET), max_size=30).map("".join),
       stops=st.lists(st.lists(st.sampled_from(_ML_ALPHABET), min_size=1, max_size=3).map("".join),
                      max_size=3),
       sizes=_sizes)
def test_multibyte_stop_strings_match_a_reference(bpe, out, stops, sizes):
    dt, deltas, _, texts = _stream(bpe, [], bpe.encode(out), stop=stops, sizes=sizes)
    text, reason = _reference_stop(out, stops)
    assert (dt.text, dt.stop_reason) == (text, reason)
    assert "".join(deltas) == text and not any(FFFD in d for d in deltas)
    assert all(out.startswith(t) for t in texts)


# ------------------------------------------------------------- prompts cut mid-character

def test_prompt_cut_inside_a_character_lets_the_output_complete_it(bpe, spm):
    for tok in (bpe, spm):
        ids = tok.encode("ok 🦀 done")
        cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(FFFD))
        dt, deltas, _, _ = _stream(tok, ids[:cut], ids[cut:])
        # the prompt's bytes of the crab go with the output (with a space merged into them)
        assert dt.text in ("🦀 done", " 🦀 done") and "".join(deltas) == dt.text


def test_context_that_starts_inside_a_character(spm, bpe):
    # unseen emoji split into byte tokens: the last few prompt tokens begin inside one
    for tok in (spm, bpe):
        p, o = tok.encode("x 🦀🦑🦐"), tok.encode("中a")
        assert tok.decode(p[-5:]).startswith(FFFD)
        full, head = tok.decode(p + o), tok.decode(p)
        dt, deltas, _, _ = _stream(tok, p, o)
        assert dt.text == full[len(head):] and FFFD not in dt.text and "中a" in dt.text
        assert "".join(deltas) == dt.text


@HYP
@given(prompt=st.lists(st.integers(0, 419), max_size=12), out=st.lists(st.integers(0, 419), max_size=40),
       sizes=_sizes)
def test_arbitrary_prompt_and_output_ids(bpe, prompt, out, sizes):
    """Garbage prompts too: the text is the tail of decode(prompt + output)."""
    dt, deltas, _, _ = _stream(bpe, prompt, out, sizes=sizes)
    assert "".join(deltas) == dt.text
    assert bpe.decode(prompt + out).endswith(dt.text)


# ------------------------------------------------------------------------------ misc

def test_finish_is_final_and_idempotent(tiny):
    dt = IncrementalDetokenizer(tiny, [1])
    dt.update(tiny.encode("abc")[1:])
    assert dt.output_delta(False) == "abc"                    # no stop strings: nothing held
    assert dt.finish() is None and dt.finished and not dt.stopped
    assert dt.finish() is None and dt.output_delta(True) == ""
    assert dt.update(tiny.encode("def")[1:]) is None and dt.text == "abc"
    assert dt.update([]) is None


def test_tokenizer_helpers(tiny):
    ids = tiny.encode("Hello")
    assert tiny.convert_ids_to_tokens(ids)[0] == "<s>"
    assert "".join(tiny.convert_ids_to_tokens(ids[1:])) == "Hello"
    assert tiny.convert_ids_to_tokens([10**6]) == [None]
    assert tiny.vocab_size >= 131
    assert tiny.decode(ids) == "Hello" and tiny.decode(ids, skip_special_tokens=False) == "<s>Hello"
    assert tiny.decode(tuple(ids)) == "Hello" and tiny.token_id("</s>") == 2
