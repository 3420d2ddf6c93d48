"""Artifact trust (runtime/trust.py): nothing executable from an artifact runs unless it is
signed by a trusted key, verified by regenerating it, or trusted by the operator.

Tampered kernels, plans, cubins and manifests, with the manifest's hashes recomputed so
they match, are refused by every command and backend; a payload that would create a marker
file proves that nothing of them ran. The session's artifacts are signed with the test
session's per-user key (conftest sets XDG_CONFIG_HOME), as a user's own artifacts are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from braze.ir.errors import BrazeError
from braze.signing import sign_artifact, load_private_key
from cli_helpers import assert_one_line_error, run
from trust_helpers import another_host, copy, make_key, manifest, payload, rehash, write_manifest

HANG_GUARD = 5.0      # seconds: these fail in milliseconds; only a hang comes near it
PROMPT = ("--prompt-ids", "1,2,3", "--max-tokens", "2")


@pytest.fixture
def art(store, tmp_path):
    """A signed -O2 artifact (kernels and plans), ours to tamper with."""
    return copy(store.artifact("llama", opt_level=2), tmp_path / "a.braze")


def _llm_refuses(art, backend, *needles, **kw):
    from braze.runtime import LLM
    with pytest.raises(BrazeError) as e:
        LLM(art, backend=backend, **kw)
    for n in needles:
        assert n in str(e.value), str(e.value)
    return str(e.value)


# -- what is admitted ------------------------------------------------------------------------

def test_own_artifact_is_signed_and_needs_no_flags(art):
    code, out, err = run("inspect", art)
    assert code == 0, err
    assert "trust      signed: signed by ed25519:" in out
    code, out, err = run("generate", art, *PROMPT, "--backend", "interpret", "--json")
    assert code == 0, err
    assert len(json.loads(out)["token_ids"]) == 2


@pytest.mark.parametrize("case, opt_level", [("llama", 0), ("llama", 2), ("mixtral", 2),
                                             ("qwen3_moe-dense-middle", 2),
                                             ("qwen3-headdim24-tied", 2)])
def test_unsigned_artifact_is_verified_by_regeneration(store, tmp_path, case, opt_level):
    from braze.runtime import open_artifact
    a = copy(store.artifact(case, opt_level=opt_level), tmp_path / "a")
    (a / "signature.json").unlink()
    trust = open_artifact(a).trust
    assert (trust.how, trust.cubins) == ("verified", False)
    assert trust.kernel_hashes == {rel[8:-3]: d for rel, d in manifest(a)["files"].items()
                                   if rel.startswith("kernels/")}


def test_verifying_imports_codegen_lowering_but_no_compiler(art):
    (art / "signature.json").unlink()
    code = f"""
import sys
from braze.runtime import LLM, SamplingParams
assert LLM({str(art)!r}, backend="reference").artifact.trust.how == "verified"
mods = [m for m in sys.modules if m.startswith("braze.")]
bad = [m for m in mods if m.split('.')[1] in ('frontend', 'passes', 'models', 'compiler')]
assert not bad, bad
assert 'braze.codegen.plan' in mods
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# -- tampering: refused everywhere, nothing runs -----------------------------------------------

def _tamper_kernel(art, marker):
    f = art / "kernels" / "norm.py"
    f.write_text(payload(marker) + f.read_text())
    return "kernels/norm.py"


def _tamper_plan(art, marker):
    """A kernel module of the attacker's, named by the plan and listed with its hash."""
    (art / "kernels" / "evil.py").write_text(payload(marker) + "import triton\n\n@triton.jit\n"
                                             "def embedding_kernel(*args):\n    pass\n")
    m = manifest(art)
    for seg in m["plan"]["segments"]:
        for launch in seg["launches"]:
            if launch.get("module") == "embedding":
                launch["module"] = "evil"
    for k in m["kernels"].values():
        if k["module"] == "embedding":
            k["module"] = "evil"
    write_manifest(art, m)
    return "kernels/evil.py"


def _first_kernel_launch(m: dict) -> tuple[dict, str]:
    """The first kernel launch of manifest `m`, and its path as refusals name it."""
    return next((launch, f"segments[{i}].launches[{j}]")
                for i, seg in enumerate(m["plan"]["segments"])
                for j, launch in enumerate(seg["launches"]) if "kernel" in launch)


def _tamper_grid(art, marker):
    """Honest kernels, launched over a grid 64 times too large (out of bounds)."""
    m = manifest(art)
    launch, where = _first_kernel_launch(m)
    launch["grid"][0] = f"({launch['grid'][0]}) * 64"
    write_manifest(art, m)
    return f"manifest.json's launch plan at {where}.grid"


TAMPER = {"kernel": _tamper_kernel, "plan": _tamper_plan, "grid": _tamper_grid}


@pytest.mark.parametrize("kind", sorted(TAMPER))
@pytest.mark.parametrize("signature", ["kept", "removed"])
def test_tampered_artifact_is_refused_on_every_backend(art, tmp_path, kind, signature):
    marker = tmp_path / "ran"
    named = TAMPER[kind](art, marker)
    rehash(art, keep_signature=signature == "kept")
    # the refusal comes before any backend work: even "cuda" on a machine without a GPU
    # answers with it, not with "needs a CUDA GPU"
    for backend in ("reference", "interpret", "cuda", "auto"):
        if signature == "kept":
            _llm_refuses(art, backend, "signature.json does not match manifest.json",
                         "refused even with --trust-artifact", "recompile")
        else:
            _llm_refuses(art, backend, named, "no signature.json", "--trust-artifact",
                         "--trusted-keys", "recompile")
    assert not marker.exists()


def test_tampered_kernel_is_refused_by_every_command(art, tmp_path):
    marker = tmp_path / "ran"
    _tamper_kernel(art, marker)
    rehash(art)
    for backend in ("interpret", "reference"):
        code, _, err = run("generate", art, *PROMPT, "--backend", backend)
        assert_one_line_error(code, err, "kernels/norm.py", "not trusted", "--trust-artifact")
        code, _, err = run("serve", art, "--port", "0", "--backend", backend)
        assert_one_line_error(code, err, "kernels/norm.py", "not trusted")
    code, out, err = run("inspect", art)        # shows, runs nothing
    assert code == 0 and "trust      none: kernels/norm.py differs" in out, out + err
    assert not marker.exists()


def test_tampered_file_without_recomputed_hash_is_refused(art, tmp_path):
    marker = tmp_path / "ran"
    _tamper_kernel(art, marker)
    code, _, err = run("generate", art, *PROMPT, "--backend", "interpret")
    assert_one_line_error(code, err, "kernels/norm.py", "sha256")
    assert not marker.exists()


@pytest.mark.parametrize("when", ["after-open", "hashes-skipped"])
def test_kernel_text_is_checked_when_read_not_only_at_open(art, tmp_path, when):
    """A kernel file swapped after the artifact was opened, or opened without the bulk hash
    check (as compile reopens what it just wrote), is refused when the runtime reads it to
    execute it: trust never rests on that check alone."""
    from braze.runtime import LLM, open_artifact
    marker = tmp_path / "ran"
    if when == "after-open":
        opened = open_artifact(art)
        _tamper_kernel(art, marker)
    else:
        _tamper_kernel(art, marker)
        opened = open_artifact(art, check_hashes=False)
        assert opened.trust.how == "signed"
    with pytest.raises(BrazeError, match="norm.py is not the file that was verified or signed"):
        LLM(opened, backend="interpret", num_kv_blocks=8)
    assert not marker.exists()


def test_kernel_module_names_stay_inside_the_artifact(art, tmp_path):
    """Even an artifact the operator trusts cannot name a module outside kernels/."""
    from braze.runtime import LLM, SamplingParams
    marker = tmp_path / "ran"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evilmod.py").write_text(payload(marker))
    m = manifest(art)
    for seg in m["plan"]["segments"]:
        for launch in seg["launches"]:
            if launch.get("module") == "norm":
                launch["module"] = "../../outside/evilmod"
    write_manifest(art, m)
    rehash(art)
    with pytest.raises(BrazeError, match="not a plain identifier"):
        LLM(art, backend="interpret", num_kv_blocks=8,
            trust_artifact=True).generate([[1, 2, 3]], SamplingParams(max_tokens=1))
    assert not marker.exists()


def test_cubins_run_only_from_signed_artifacts(store, tmp_path):
    """Verification cannot rebuild cubins: a verified artifact never loads them; a signed one
    does, and a cubin changed after it was signed is refused."""
    from braze.runtime import open_artifact
    from braze.runtime.cubins import CubinCache
    from braze.kernel_modules import KernelModules
    src = store.artifact("llama", opt_level=2, dtype="bfloat16", targets="sm_80,sm_90")
    a = copy(src, tmp_path / "signed")
    assert open_artifact(a).trust.cubins
    vid, key, entry = next((vid, key, e) for vid, k in manifest(a)["kernels"].items()
                           for key, e in k["cubins"]["sm_90"].items())
    cubin = a / entry["cubin"]
    cubin.write_bytes(cubin.read_bytes()[:-8] + b"\x00" * 8)
    rehash(a, keep_signature=True)
    with pytest.raises(BrazeError, match="signature.json does not match"):
        open_artifact(a)
    rehash(a)                                   # unsigned: verified, cubins shut out
    trust = open_artifact(a).trust
    assert (trust.how, trust.cubins) == ("verified", False)

    b = copy(src, tmp_path / "swapped")        # signed, then swapped after the check at open
    art = open_artifact(b)
    launches = {l["kernel"]: l for s in art.manifest["plan"]["segments"] for l in s["launches"]
                if "kernel" in l}
    cache = CubinCache(art.root, art.manifest, KernelModules(b / "kernels", False,
                                                             hashes=art.trust.kernel_hashes))
    cache.usable, cache.target = True, "sm_90"  # as on an H100 with the same triton
    swapped = b / entry["cubin"]
    swapped.write_bytes(swapped.read_bytes()[:-8] + b"\x00" * 8)
    assert cache.get(vid, launches[vid], key) is None      # not loaded: the kernel JITs from source
    other = next(v for v in launches if v != vid)
    other_key = next(iter(art.manifest["kernels"][other]["cubins"]["sm_90"]))
    assert cache.get(other, launches[other], other_key) is not None     # an untouched one loads


# -- paths ----------------------------------------------------------------------------------

def _refusal(art) -> str:
    from braze.runtime import open_artifact
    with pytest.raises(BrazeError) as e:
        open_artifact(art)
    return str(e.value)


@pytest.mark.parametrize("where", ["files-parent", "files-absolute", "weights", "tokenizer",
                                   "cubin"])
def test_manifest_paths_outside_the_artifact_are_refused(art, tmp_path, where):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    m = manifest(art)
    if where == "files-parent":
        m["files"]["../secret.txt"] = "0" * 64
    elif where == "files-absolute":
        m["files"][str(secret)] = "0" * 64
    elif where == "weights":
        m["weights"]["files"] = [str(secret)]
    elif where == "tokenizer":
        m["tokenizer"] = str(tmp_path)
    else:
        vid = next(iter(m["kernels"]))
        m["kernels"][vid]["targets"] = {"sm_90": {"cubin": "../secret.txt", "meta": "x.json"}}
    write_manifest(art, m)
    msg = _refusal(art)
    assert "secret" in msg or str(tmp_path) in msg, msg
    if where.startswith("files"):
        # the same answer whether or not the outside file exists: no probing the host
        secret.unlink()
        assert _refusal(art) == msg


@pytest.mark.parametrize("link", ["file", "directory"])
def test_symlinks_in_an_artifact_are_refused(art, tmp_path, link):
    tok = art / "tokenizer" / "tokenizer.json"
    outside = tmp_path / "outside"
    if link == "file":
        outside.write_bytes(tok.read_bytes())      # same bytes: the hash would match
        tok.unlink()
        tok.symlink_to(outside)
        name = "tokenizer/tokenizer.json"
    else:
        copy(art / "tokenizer", outside)
        import shutil
        shutil.rmtree(art / "tokenizer")
        (art / "tokenizer").symlink_to(outside, target_is_directory=True)
        name = "tokenizer"
    msg = _refusal(art)
    assert "symbolic link" in msg and name in msg, msg


def test_a_fifo_in_an_artifact_is_refused_not_read(art):
    os.mkfifo(art / "kernels" / "pipe.py")
    m = manifest(art)
    m["files"]["kernels/pipe.py"] = "0" * 64
    write_manifest(art, m)
    t = time.perf_counter()
    assert "not a regular file" in _refusal(art)
    assert time.perf_counter() - t < HANG_GUARD


def test_the_artifact_root_may_be_a_link(art, tmp_path):
    """Deployments point a stable name at the current artifact; only links inside it are refused."""
    from braze.runtime import open_artifact
    (tmp_path / "current").symlink_to(art, target_is_directory=True)
    assert open_artifact(tmp_path / "current").trust.how == "signed"


# -- hostile graph.bir and plans ------------------------------------------------------------------

def test_hostile_graph_fails_fast_naming_file_and_line(art):
    g = art / "graph.bir"
    lines = g.read_text().splitlines()
    n = next(i for i, ln in enumerate(lines) if "[T, 64]" in ln)
    lines[n] = lines[n].replace("[T, 64]", "[T*(9**9**8), 64]", 1)
    g.write_text("\n".join(lines) + "\n")
    rehash(art)
    code, _, err = run("inspect", art, timeout=120)      # the timeout is the hang guard
    assert_one_line_error(code, err, f"graph.bir line {n + 1}:", "cannot parse dimension")


def test_hostile_plan_fails_fast(art):
    m = manifest(art)
    launch, where = _first_kernel_launch(m)
    launch["grid"][0] = "(" * 5000 + "T" + ")" * 5000
    write_manifest(art, m)
    rehash(art)
    t = time.perf_counter()
    _llm_refuses(art, "interpret", f"launch plan at {where}.grid")
    from braze.runtime import LLM, SamplingParams
    with pytest.raises(BrazeError, match="launch expression .* longer than"):
        LLM(art, backend="interpret", num_kv_blocks=8,
            trust_artifact=True).generate([[1, 2]], SamplingParams(max_tokens=1))
    assert time.perf_counter() - t < 60     # hang guard; the LLM's own start-up takes seconds


# -- signatures and other hosts ---------------------------------------------------------------

@pytest.fixture
def foreign(art, tmp_path):
    """An artifact this braze cannot regenerate (as from another braze version: a kernel
    source differs harmlessly), signed with a CI key. -> (artifact, key dir)"""
    f = art / "kernels" / "norm.py"
    f.write_text(f.read_text() + "\n# built by another braze\n")
    rehash(art)
    key, _ = make_key(tmp_path, "ci")
    sign_artifact(art, load_private_key(key))
    return art, tmp_path / "keys"


def test_signed_artifact_runs_on_another_host_with_the_public_key(foreign, tmp_path):
    art, keys = foreign
    host = another_host(tmp_path / "host2")
    code, out, err = run("generate", art, *PROMPT, "--backend", "interpret", "--json",
                         "--trusted-keys", keys, env=host)
    assert code == 0, err
    code, out, err = run("inspect", art, "--trusted-keys", keys, env=host)
    assert code == 0 and "trust      signed: signed by ed25519:" in out, out + err


def test_signed_artifact_fails_on_another_host_without_the_key(foreign, tmp_path):
    art, keys = foreign
    host = another_host(tmp_path / "host2")
    key_id = json.loads((art / "signature.json").read_text())["key_id"]
    code, _, err = run("generate", art, *PROMPT, "--backend", "reference", env=host)
    assert_one_line_error(code, err, "kernels/norm.py", f"signed by {key_id}",
                          "does not trust", "--trusted-keys")
    # the operator may still say so, loudly
    code, out, err = run("generate", art, *PROMPT, "--backend", "reference", "--json",
                         "--trust-artifact", env=host)
    assert code == 0, err
    assert "TRUSTING ARTIFACT" in err and "WITHOUT VERIFICATION" in err


def test_openssh_keys_sign_and_verify(art, tmp_path, store):
    key, _ = make_key(tmp_path, "ssh", "openssh")
    out = tmp_path / "b.braze"
    code, _, err = run("compile", store.checkpoint("llama"), "-o", out, "--opt-level", "0",
                       "--targets", "", "--sign", key, "-q")
    assert code == 0, err
    host = another_host(tmp_path / "host2")
    code, out_text, err = run("inspect", out, "--trusted-keys", tmp_path / "keys", env=host)
    assert code == 0 and "trust      signed" in out_text, out_text + err


def test_bad_signing_key_fails_before_compiling(tmp_path, store):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    code, _, err = run("compile", store.checkpoint("llama"), "-o", tmp_path / "x", "--sign", bad)
    assert_one_line_error(code, err, str(bad), "Ed25519")
    assert not (tmp_path / "x").exists()


def test_trusted_keys_writable_by_others_are_refused(foreign, tmp_path):
    art, keys = foreign
    keys.chmod(0o777)
    code, _, err = run("generate", art, *PROMPT, "--trusted-keys", keys,
                       env=another_host(tmp_path / "host2"))
    assert_one_line_error(code, err, str(keys), "other users", "chmod go-w")


def test_kernel_modules_admit_only_hashed_text(tmp_path):
    import hashlib
    from braze.kernel_modules import KernelModules
    marker = tmp_path / "ran"
    good = "import triton\n\n@triton.jit\ndef k(x):\n    pass\n"
    (tmp_path / "m.py").write_text(payload(marker) + good)
    mods = KernelModules(tmp_path, interpret=True,
                         hashes={"m": hashlib.sha256(good.encode()).hexdigest()})
    with pytest.raises(BrazeError, match="not the file that was verified"):
        mods.get("m", "k")
    with pytest.raises(BrazeError, match="not one the artifact lists"):
        mods.get("other", "k")
    assert not marker.exists()
    (tmp_path / "m.py").write_text(good)
    assert mods.get("m", "k").fn.__name__ == "k"


def test_a_new_per_user_key_is_trusted_after_the_old_one_is_replaced(monkeypatch, tmp_path):
    """Key rotation: the user deletes (or loses) signing-key.pem and the next compile makes
    a new one; its public half must be trusted too, though user@host.pub holds the old one
    (which stays trusted: artifacts signed with it still load)."""
    from braze.signing import _raw, default_private_key, trusted_keys
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    logged = []
    old = default_private_key(log=logged.append)
    (tmp_path / "config" / "braze" / "signing-key.pem").unlink()
    new = default_private_key(log=logged.append)
    trusted = trusted_keys()
    assert _raw(new.public_key()) in trusted
    assert _raw(old.public_key()) in trusted
    # the message says which file to copy to another host: the one holding the new key
    pub = trusted[_raw(new.public_key())].file
    assert str(pub) in logged[-1]


@pytest.mark.parametrize("signature", ["mismatched", "garbage"])
def test_a_broken_signature_refusal_gives_advice_that_works(art, signature):
    """A signed artifact changed after signing is refused even with --trust-artifact, so the
    refusal must not offer that flag as a way in; what it does offer must admit it."""
    from braze.runtime import open_artifact
    m = manifest(art)
    m["options"]["max_num_seqs"] = 8          # an edit by hand, hashes still right
    write_manifest(art, m)
    if signature == "garbage":
        (art / "signature.json").write_text("not json\n")
    with pytest.raises(BrazeError) as e:
        open_artifact(art, trust_artifact=True)
    msg = str(e.value)
    assert "signature.json" in msg and "pass --trust-artifact" not in msg, msg
    assert "delete" in msg and "signature.json" in msg, msg
    from braze.inspect import format_summary, summarize       # inspect says the same
    line = next(ln for ln in format_summary(summarize(art)).splitlines()
                if ln.startswith("trust"))
    assert "refused even with --trust-artifact" in line and "see --trusted-keys" not in line
    (art / "signature.json").unlink()         # the advice, followed
    assert open_artifact(art, trust_artifact=True).trust.how == "operator"


@pytest.mark.parametrize("where", ["mtp-graph", "mtp-weights", "mtp-rank-weights",
                                   "rank-weights"])
def test_every_file_the_manifest_names_must_be_listed_mtp_and_ranks_too(art, tmp_path, where):
    """An unsigned artifact (no signature to break) whose manifest names a file outside it
    as its MTP graph or as weights of a rank: refused at open, before anything reads it.
    Verification used to parse that MTP graph, quoting the outside file's first line in its
    error (and reading /dev/zero until memory ran out); weights are not covered by
    verification, so a verified artifact would have loaded another file's tensors."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you\n")
    (art / "signature.json").unlink()
    m = manifest(art)
    if where == "mtp-graph":
        m["mtp"] = {"graph": str(secret), "plan": {}}
    elif where == "mtp-weights":
        m["mtp"] = {"num_layers": 1, "files": ["../secret.txt"], "bytes": 0}
    elif where == "mtp-rank-weights":
        m["mtp"] = {"num_layers": 1, "files": [], "ranks": [{"files": [str(secret)]}]}
    else:
        m["weights"]["ranks"] = [{"files": [str(secret)], "params": {}}]
    write_manifest(art, m)
    msg = _refusal(art)
    assert "not for you" not in msg, msg
    assert "secret.txt" in msg and "not one of the files its manifest lists" in msg, msg
