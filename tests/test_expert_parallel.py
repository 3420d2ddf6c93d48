"""Expert parallelism (`--expert-parallel`) on CPUs: gloo process groups, tiny float32 MoEs.

Whole experts per rank (rank r holds experts [r*E/N, (r+1)*E/N)), attention tensor-parallel
as without the flag. The reference is the same checkpoint compiled for one rank: the
2-rank artifact gives the same logits (1e-4) and, through the engine, the same greedy
tokens. The pass-level check (each rank's graph summed = the unsharded graph, on the
reference interpreter) is tests/test_pass_shard_experts.py.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from braze.ir.errors import BrazeError

from test_tensor_parallel import _greedy, _logits, _run_ranks

EP = dict(opt_level=2, tensor_parallel_size=2, expert_parallel=True)


@pytest.mark.parametrize("case", ["qwen3_moe-dense-middle", "mixtral",
                                  # the MoE beside the MLP, its per-expert scale
                                  "gemma4-ple-kvshare-moe"])
def test_logits_equal_one_rank(store, case):
    from braze.runtime import Executor, open_artifact
    one = Executor(open_artifact(store.artifact(case, opt_level=2)), backend="reference",
                   num_blocks=8)
    want = _logits(one)
    got = _run_ranks(store.artifact(case, **EP), 2)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


# the interpret backend replays the launch plans: the fused MoE kernels with local_experts
# and the all-reduce as extern calls, as on a GPU (slow: fewer tokens)
@pytest.mark.parametrize("case,backend,tokens", [("qwen3_moe-dense-middle", "reference", 6),
                                                 ("mixtral", "reference", 6),
                                                 ("qwen3_moe-dense-middle", "interpret", 2)])
def test_engine_greedy_tokens_equal_one_rank(store, case, backend, tokens):
    from braze.runtime import LLM
    opts = dict(backend=backend, max_num_tokens=16, num_kv_blocks=16, buckets=[4, 8, 16])
    want = _greedy(LLM(store.artifact(case, opt_level=2), **opts), tokens)
    with LLM(store.artifact(case, **EP), **opts) as llm:
        assert _greedy(llm, tokens) == want


def test_each_rank_file_holds_only_its_experts_and_inspect_shows_them(store):
    from safetensors import safe_open

    from braze.inspect import format_summary, summarize
    from braze.runtime import open_artifact
    art = open_artifact(store.artifact("qwen3_moe-dense-middle", **EP))
    p = art.manifest["parallel"]
    assert p["expert_parallel"] is True
    assert p["experts"] == {"num_experts": 4, "ranges": [[0, 2], [2, 4]]}
    full = open_artifact(store.artifact("qwen3_moe-dense-middle", opt_level=2)).load_weights()
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    down = "model.layers.0.mlp.experts.down_proj"
    assert full[gate_up].shape[0] == 4
    for r in range(2):
        (f,) = art.manifest["weights"]["ranks"][r]["files"]
        with safe_open(str(art.root / f), "pt") as sf:
            names = set(sf.keys())
            for name in names:
                if ".experts." in name:       # every expert tensor: this rank's 2 experts only
                    assert sf.get_tensor(name).shape[0] == 2, name
            assert torch.equal(sf.get_tensor(gate_up), full[gate_up][2 * r:2 * r + 2])
            assert torch.equal(sf.get_tensor(down), full[down][2 * r:2 * r + 2])
            assert torch.equal(sf.get_tensor("ep.experts"), torch.arange(2 * r, 2 * r + 2))
            # the router is replicated: every rank routes every token over all 4 experts
            router = "model.layers.0.mlp.gate.weight"
            assert torch.equal(sf.get_tensor(router), full[router])
        assert art.load_weights(rank=r)[gate_up].shape[0] == 2
    text = format_summary(summarize(art.root))
    assert "expert-parallel: 4 experts, whole experts per rank: r0[0:2], r1[2:4]" in text
    assert f"shard @{gate_up.replace('gate_up', 'gate')} dim 0: r0[0:2], r1[2:4] (experts)" in text
    # one all_reduce per MoE layer (after the combine), as for tensor parallelism
    ops = art.graph.op_counts()
    assert ops["fused_moe"] == 2
    assert all(n.attrs["local_experts"] == 2 for n in art.graph.nodes if n.op == "fused_moe")


def _tiny(tmp_path, family, **cfg):
    from braze.tiny import make_checkpoint
    with contextlib.redirect_stderr(io.StringIO()):
        return make_checkpoint(family, tmp_path / "m", seed=1, **{"num_hidden_layers": 1, **cfg})


def test_errors_name_the_dimension_and_the_flag(tmp_path):
    import braze
    ckpt = _tiny(tmp_path, "qwen3_moe", num_experts=6, mlp_only_layers=[])
    with pytest.raises(BrazeError, match=r"num_experts \(6, dim 0 of @model\.layers\.0\.mlp\."
                                         r"experts\.\w+\) is not divisible by "
                                         r"--tensor-parallel-size 4"):
        braze.compile(ckpt, tmp_path / "a", targets="", tensor_parallel_size=4,
                      expert_parallel=True)
    with pytest.raises(BrazeError, match=r"--expert-parallel needs --tensor-parallel-size > 1"):
        braze.compile(ckpt, tmp_path / "a", targets="", expert_parallel=True)
    dense = _tiny(tmp_path / "d", "llama")
    with pytest.raises(BrazeError, match="no mixture-of-experts layer"):
        braze.compile(dense, tmp_path / "a", targets="", tensor_parallel_size=2,
                      expert_parallel=True)
    assert not (tmp_path / "a").exists()


def test_cli_help_and_flag(tmp_path, capsys):
    from braze.cli import main
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    out = capsys.readouterr().out
    assert "--expert-parallel" in out and "whole experts" in out
    ckpt = _tiny(tmp_path, "qwen3_moe", mlp_only_layers=[])
    assert main(["compile", str(ckpt), "-o", str(tmp_path / "a"), "--targets", "",
                 "--tensor-parallel-size", "2", "--expert-parallel", "--quiet"]) == 0
    from braze.runtime import open_artifact
    assert open_artifact(tmp_path / "a").manifest["parallel"]["expert_parallel"] is True
    assert main(["inspect", str(tmp_path / "a")]) == 0
    assert "expert-parallel: 4 experts" in capsys.readouterr().out


def test_deepseek_v3_routed_moe_logits_equal_one_rank(tmp_path):
    """DeepSeek-V3's graph-computed routing (grouped sigmoid top-k, scaled weights) with
    its 8 experts 4 per rank, and its shared expert tensor-parallel."""
    import braze
    from braze.runtime import Executor, open_artifact
    ckpt = _tiny(tmp_path, "deepseek_v3", num_hidden_layers=2)
    one = braze.compile(ckpt, tmp_path / "one", targets="")
    want = _logits(Executor(open_artifact(one.root), backend="reference", num_blocks=8))
    art = braze.compile(ckpt, tmp_path / "ep", targets="", **EP)
    ops = art.graph.op_counts()
    assert ops["fused_moe_routed"] == 1 and art.manifest["parallel"]["experts"]["ranges"] == \
        [[0, 4], [4, 8]]
    got = _run_ranks(art.root, 2)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        assert torch.equal(g.argmax(-1), w.argmax(-1))


def test_compiling_reads_each_expert_once_not_once_per_rank(tmp_path, monkeypatch):
    """The compiler cuts each rank's experts from the checkpoint's per-expert tensors by
    reading only that rank's (not the whole stack per rank, then a slice of it)."""
    import collections

    import braze
    from braze.frontend.weights import Checkpoint
    ckpt = _tiny(tmp_path, "qwen3_moe", mlp_only_layers=[])
    reads = collections.Counter()
    get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name: (reads.update([name]),
                                                               get(self, name))[1])
    braze.compile(ckpt, tmp_path / "ep", targets="", **EP)
    experts = {n: c for n, c in reads.items() if ".experts." in n}
    if not experts:
        pytest.skip("this transformers writes the experts as one stacked tensor")
    assert len(experts) == 4 * 3 and set(experts.values()) == {1}, experts
