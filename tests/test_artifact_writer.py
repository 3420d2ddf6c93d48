"""The artifact writer streams weights: one tensor in memory at a time, files that
safetensors reads back bit for bit, and manifest hashes of the bytes on disk."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from braze.artifact import sha256_file
from braze.ir import Graph
from braze.ir.errors import BrazeError
from braze.ir.types import TensorType, torch_dtype
from braze.codegen.artifact_writer import write_artifact

DTYPES = ["f32", "f16", "bf16", "i64", "bool"]


def _graph(specs):
    g = Graph()
    x = g.add_input("x", TensorType((1,), "f32"))
    g.set_output("y", x)
    for i, (shape, dtype) in enumerate(specs):
        g.add_param(f"p{i}", TensorType(tuple(shape), dtype))
    return g


def _value(name, ptype):
    gen = torch.Generator().manual_seed(hash(name) % 2**31)
    t = torch.randn(tuple(ptype.shape), generator=gen) * 100
    return t.to(torch_dtype(ptype.dtype))


def _write(tmp_path, g, load, shard_bytes):
    return write_artifact(tmp_path / "a.braze", g, load, {"config": {}}, {}, tmp_path,
                          shard_bytes=shard_bytes)


@settings(max_examples=25, deadline=None)
@given(specs=st.lists(st.tuples(st.lists(st.integers(0, 5), min_size=0, max_size=3),
                                st.sampled_from(DTYPES)), min_size=1, max_size=8),
       shard_bytes=st.integers(1, 300))
def test_weights_read_back_exactly_and_hash_to_the_manifest(tmp_path_factory, specs,
                                                           shard_bytes):
    tmp_path = tmp_path_factory.mktemp("w")
    g = _graph(specs)
    out = _write(tmp_path, g, lambda n: _value(n, g.params[n].type), shard_bytes)
    manifest = json.loads((out / "manifest.json").read_text())
    w = manifest["weights"]
    assert set(w["params"]) == set(g.params)
    total = 0
    for fname in w["files"]:
        assert manifest["files"][fname] == sha256_file(out / fname)
        with safe_open(str(out / fname), framework="pt") as f:
            names = list(f.keys())
            size = 0
            for name in names:
                assert w["params"][name] == fname
                got, want = f.get_tensor(name), _value(name, g.params[name].type)
                assert got.dtype == want.dtype and torch.equal(got, want)
                size += got.numel() * got.element_size()
            # a file over the limit holds exactly one tensor
            assert size <= shard_bytes or len(names) == 1
            total += size
    assert total == w["bytes"]


def test_the_writer_holds_one_weight_at_a_time(tmp_path):
    g = _graph([((64, 32), "f32")] * 6)
    alive = []

    def load(name):
        gc.collect()
        assert not any(r() is not None for r in alive), "an earlier weight is still held"
        t = _value(name, g.params[name].type)
        alive.append(weakref.ref(t))
        return t

    _write(tmp_path, g, load, shard_bytes=3 * 64 * 32 * 4)
    assert len(alive) == 6


def test_a_weight_of_the_wrong_shape_names_the_parameter(tmp_path):
    g = _graph([((4, 4), "f32")])
    with pytest.raises(BrazeError, match="parameter p0: got torch.float32 \\[4, 5\\]"):
        _write(tmp_path, g, lambda n: torch.zeros(4, 5), shard_bytes=1 << 20)
    assert not (tmp_path / "a.braze").exists()
    assert not list(tmp_path.glob("a.braze.partial*"))


def test_checkpoint_reads_every_shard_with_one_file_mapped_at_a_time(tmp_path):
    from safetensors.torch import load_file

    from braze.frontend.weights import Checkpoint
    from braze.tiny import make_checkpoint
    d = make_checkpoint("llama", tmp_path / "m", max_shard_size="40KB", with_tokenizer=False)
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) > 2
    ckpt = Checkpoint(d)
    for f in shards:
        for name, want in load_file(str(f)).items():
            assert torch.equal(ckpt.get(name), want)
            assert len(ckpt._handles) == 1     # the mapped pages of one shard, not all


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_made_at_the_output_path_while_compiling_is_not_deleted(tmp_path, force):
    """The output path is checked before compiling, and again when the finished artifact
    replaces it: what appeared there meanwhile (a user's directory, not an artifact) is
    kept and the compile fails, as it would have at the start, with or without --force."""
    g = _graph([((4, 4), "f32")])
    out = tmp_path / "a.braze"

    def load(name):                    # minutes of compiling, during which someone writes
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")
        return torch.zeros(4, 4)

    with pytest.raises(BrazeError, match=str(out)):
        write_artifact(out, g, load, {"config": {}}, {}, tmp_path, overwrite=force)
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob("a.braze.partial*"))


def test_two_compiles_to_one_path_do_not_write_into_each_other(tmp_path):
    """A second compile to the same -o (another terminal, a CI retry) started while the
    first runs: the first's half-written directory is its own, not deleted and refilled by
    the second; one artifact is written, whole, and the other compile says the path is
    taken (it was compile B's unfinished directory that A's start used to delete)."""
    from braze.artifact import MANIFEST, verify_files
    g = _graph([((4, 4), "f32"), ((8,), "f32")])
    out = tmp_path / "a.braze"
    inner = {}

    def load(name):
        if not inner:               # compile B runs start to end while A is mid-way
            inner["b"] = write_artifact(out, g, lambda n: torch.ones(g.params[n].type.shape),
                                        {"config": {}}, {}, tmp_path)
        return torch.zeros(g.params[name].type.shape)

    with pytest.raises(BrazeError, match=f"{out} already exists"):
        write_artifact(out, g, load, {"config": {}}, {}, tmp_path)
    verify_files(out, json.loads((out / MANIFEST).read_text()))   # B's artifact, whole
    assert not list(tmp_path.glob("a.braze.partial*"))


def test_what_a_killed_compile_left_is_removed_by_the_next(tmp_path):
    import os
    import socket
    g = _graph([((4, 4), "f32")])
    here = f"a.braze.partial-{socket.gethostname()}"
    dead = tmp_path / f"{here}-999999999-x1"        # beyond any pid: its compile died
    legacy = tmp_path / "a.braze.partial"
    running = tmp_path / f"{here}-{os.getpid()}-x2"     # a compile still running
    elsewhere = tmp_path / "a.braze.partial-otherhost-999999999-x3"   # its pid means nothing here
    for d in (dead, legacy, running, elsewhere):
        d.mkdir()
        (d / "graph.bir").write_text("half")
    _write(tmp_path, g, lambda n: torch.zeros(4, 4), shard_bytes=1 << 20)
    assert not dead.exists() and not legacy.exists()
    assert running.exists() and elsewhere.exists()


def test_existing_destination_names_the_python_spelling_too(tmp_path):
    """braze.compile to an existing artifact says how to replace it from Python as well
    (force=True): it named only the command line's --force, which Python has no way to pass.
    (The destination is checked before the model is read.)"""
    import braze
    out = tmp_path / "a.braze"
    out.mkdir()
    with pytest.raises(BrazeError, match=r"already exists; pass --force \(force=True in "
                                         r"braze\.compile\) to replace it"):
        braze.compile(tmp_path / "model", out, targets="")
