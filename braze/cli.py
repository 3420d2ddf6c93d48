"""The `braze` command line (DESIGN §1). Every user error is one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from braze import __version__
from braze.config import SMALL_M_GEMM, CompileOptions
from braze.ir.errors import BrazeError
from braze.ir.segments import CUDAGRAPH_MODES
from braze.runtime.options import BACKENDS, SAMPLERS
from braze.serving.options import DEFAULT_MAX_REQUEST_BODY_BYTES

EXIT_ERROR = 1


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _fraction(text: str) -> float:
    """A share in (0, 1]."""
    v = _positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--prompt-ids takes comma-separated integers like 1,2,3, got {text!r}") from None


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _escaped(text: str) -> str:
    """A shell argument with the usual backslash escapes read (`--stop "\\n"` is a newline);
    any other backslash stays as it is."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


BACKEND_HELP = ("auto (default): cuda on a GPU, else reference; cuda: the launch plans, stored "
                "cubins and CUDA graphs on a GPU; reference: the IR interpreter in torch, any "
                "device; interpret: the Triton kernels under Triton's CPU interpreter (slow; "
                "for checking kernels without a GPU)")


def cmd_compile(a) -> int:
    from braze.compiler import compile
    compile(a.model_dir, a.output, force=a.force, dump_ir=a.dump_ir, explain=a.explain,
            log=None if a.quiet else _log,
            opt_level=a.opt_level, dtype=a.dtype, max_num_tokens=a.max_num_tokens,
            max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, block_size=a.block_size,
            targets=a.targets, cudagraph_mode=a.cudagraph_mode, sign=a.sign,
            lora_slots=a.lora_slots, max_lora_rank=a.max_lora_rank,
            lora_targets=a.lora_targets, max_logits_rows=a.max_logits_rows,
            tensor_parallel_size=a.tensor_parallel_size, expert_parallel=a.expert_parallel,
            small_m_gemm=a.small_m_gemm, mtp_assistant=a.mtp_assistant)
    return 0


def _sampling(a):
    from braze.runtime.sampler import SamplingParams
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, min_p=a.min_p, seed=a.seed, ignore_eos=a.ignore_eos,
                          stop=a.stop or [], presence_penalty=a.presence_penalty,
                          frequency_penalty=a.frequency_penalty,
                          repetition_penalty=a.repetition_penalty, min_tokens=a.min_tokens,
                          logprobs=a.logprobs, n=a.n)


def cmd_generate(a) -> int:
    from braze.runtime.llm import LLM
    if (a.prompt is not None) + (a.prompt_ids is not None) + (a.prompt_file is not None) != 1:
        raise BrazeError("give exactly one of --prompt TEXT, --prompt-file FILE (- for "
                         "standard input) or --prompt-ids 1,2,3")
    if a.logprobs is not None and not a.json:
        raise BrazeError("--logprobs is printed only in --json output; add --json")
    if a.prompt_file is not None:
        a.prompt = _read_prompt(a.prompt_file)
    params = _sampling(a)
    params.validate()
    _check_launcher(a.artifact)
    lora = None
    if a.lora is not None:
        from braze.runtime.lora import LoRARequest
        lora = LoRARequest(Path(a.lora).name or "lora", 1, a.lora)
    llm = LLM(a.artifact, _engine_options(a))
    try:
        out = llm.generate([a.prompt if a.prompt is not None else a.prompt_ids], params,
                           lora_request=lora)[0]
        _print_outputs(a, out)
    finally:
        llm.close()         # the KV tiers' writes land, within a bound, before the exit
    return 0


def _print_outputs(a, out) -> None:
    for o in out.outputs or [out]:
        if a.json:
            d = {"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason}
            if o.logprobs is not None:
                d["logprobs"] = [{"token_id": e.token_id, "logprob": e.logprob, "rank": e.rank,
                                  "top": [[i, v] for i, v in e.top]} for e in o.logprobs]
                d["cumulative_logprob"] = o.cumulative_logprob
            print(json.dumps(d), flush=True)
        else:
            print(o.text if o.text is not None else " ".join(map(str, o.token_ids)),
                  flush=True)


def _check_launcher(path) -> None:
    """Under torchrun every process runs the command: WORLD_SIZE > 1 with an artifact of
    one rank would run the whole model in each (generate printing it N times; serve's other
    ranks loading it for nothing), where the user meant it split over them."""
    from braze.artifact import read_manifest
    from braze.runtime.parallel import launcher_world_size, tensor_parallel_size
    world = launcher_world_size()
    if world == 1:
        return
    try:
        manifest = read_manifest(Path(path))
    except Exception:       # opening the artifact says what is wrong with it
        return
    if tensor_parallel_size(manifest) == 1:
        raise BrazeError(f"WORLD_SIZE={world} (torchrun) but artifact {path} was compiled for "
                         f"one rank: compile it with --tensor-parallel-size {world} to split "
                         f"it over the {world} processes, or run it without torchrun")


def _check_parallel_flags(a) -> None:
    """vLLM's -tp N / --enable-expert-parallel on braze serve: checked against what the
    artifact was compiled for, before its ranks start (runtime/parallel.py)."""
    if a.tensor_parallel_size is None and not a.enable_expert_parallel:
        return
    from braze.artifact import read_manifest
    from braze.runtime.parallel import check_vllm_options
    check_vllm_options(read_manifest(Path(a.artifact)), a.artifact,
                       tensor_parallel_size=a.tensor_parallel_size,
                       enable_expert_parallel=a.enable_expert_parallel or None)


def _read_prompt(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise BrazeError(f"cannot read the prompt file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise BrazeError(f"the prompt file {path} is not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None


def cmd_inspect(a) -> int:
    from braze.inspect import format_summary, summarize
    summary = summarize(a.artifact, check_hashes=not a.no_verify, trusted_keys=a.trusted_keys,
                        kernels=a.kernels)
    print(json.dumps(summary, indent=1) if a.json else format_summary(summary))
    return 0


def cmd_opt(a) -> int:
    from braze.opt import run_opt
    return run_opt(a)


def cmd_serve(a) -> int:
    try:
        from braze.serving.server import serve
    except ImportError as e:
        raise BrazeError(f"`braze serve` needs fastapi and uvicorn ({e}); "
                         "pip install 'fastapi>=0.110' 'uvicorn>=0.29'") from None
    _take_artifact(a)
    _check_launcher(a.artifact)
    _check_parallel_flags(a)
    rc = serve(a.artifact, _engine_options(a), _server_options(a))
    # the server has drained and stopped: skip the interpreter's teardown of torch, triton
    # and the engine thread, which took a second or more after "stopped" (a supervisor
    # waiting on the exit, a rolling restart, waits for it); logs and output are flushed
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def cmd_demo(a) -> int:
    from braze.demo import run_demo
    return run_demo(max_tokens=a.max_tokens, keep=a.keep)


def _engine_flags(p: argparse.ArgumentParser, kv_default: str) -> None:
    """The engine's options (runtime/options.py), the same for generate and serve."""
    p.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)
    p.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", type=_positive_int,
                   metavar="N", help=f"KV-cache blocks to allocate (default: {kv_default}; "
                                     f"--num-gpu-blocks-override is vLLM's name)")
    p.add_argument("--max-model-len", type=_positive_int, metavar="N",
                   help="the longest sequence (prompt + output) to serve: at most the "
                        "artifact's (its buffers are planned for that; braze compile "
                        "--max-model-len sets it); less refuses longer prompts and sizes the "
                        "GPU's KV cache for shorter sequences (default: the artifact's)")
    p.add_argument("--block-size", type=_positive_int, metavar="N",
                   help="tokens per KV-cache block: fixed when the artifact was compiled, so "
                        "only checked against it (vLLM's flag; default: the artifact's)")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9, metavar="F",
                   help="the share of the GPU's memory the engine may fill; the KV cache "
                        "takes what is left of it after the weights, unless --num-kv-blocks "
                        "says (default: 0.9)")
    p.add_argument("--max-num-seqs", type=_positive_int, metavar="N",
                   help="most sequences in one step (default and upper bound: the artifact's "
                        "--max-num-seqs)")
    p.add_argument("--max-num-tokens", "--max-num-batched-tokens", type=_positive_int,
                   metavar="N", dest="max_num_tokens",
                   help="most tokens in one step, prefill chunks included (default and upper "
                        "bound: the artifact's --max-num-tokens; --max-num-batched-tokens is "
                        "vLLM's name)")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   help="vLLM's flag: braze always prefills a prompt longer than "
                        "--max-num-tokens in chunks, so only the default (on) is taken")
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                   help="vLLM's: fcfs (first come, first served; the default) or priority "
                        "(requests' priority field: lower runs first, and a preemption takes "
                        "the lowest-priority running request)")
    p.add_argument("--cudagraph-mode", choices=CUDAGRAPH_MODES,
                   help="how the cuda backend captures CUDA graphs (default: the artifact's): "
                        "none, piecewise, or full (one graph per whole step)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="reuse the KV blocks of prompt prefixes seen before (default: on; "
                        "vLLM's spelling: --no-enable-prefix-caching turns it off)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="the same as --no-enable-prefix-caching")
    p.add_argument("--device", help="torch device to run on, e.g. cuda:1 (default: cuda for the "
                                    "cuda backend, else cpu)")
    p.add_argument("--buckets", type=_token_ids, metavar="1,2,4,...",
                   help="padded step sizes in tokens, one CUDA graph each (default: 1, 2, 4, "
                        "then every 8 up to 256, ...; the kernels are specialised for those)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                   help="schedule step N+1 while step N runs (default: on for cuda)")
    p.add_argument("--fused-prepare", action=argparse.BooleanOptionalAction,
                   help="write each step's inputs (token ids, positions, KV slots, sequence "
                        "lengths, block tables, padding) with one Triton kernel instead of "
                        "about 20 small torch ops on the device (default: on for cuda; "
                        "JIT-compiled at start-up)")
    p.add_argument("--debug", action="store_true",
                   help="check on every step that captured graphs still see their buffers")
    p.add_argument("--speculative", "--speculative-config", metavar="JSON",
                   help='speculative decoding (vLLM\'s --speculative-config, and its keys), '
                        'e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 3}\' (prompt lookup; also '
                        '"prompt_lookup_max", "prompt_lookup_min") or \'{"method": "draft", '
                        '"model": DRAFT_ARTIFACT, "num_speculative_tokens": 3}\' or '
                        '\'{"method": "mtp", "num_speculative_tokens": 1}\' (the artifact\'s '
                        'DeepSeek-V3 multi-token-prediction layer, or the Gemma 4 assistant '
                        'compiled with --mtp-assistant); output is '
                        'exactly what decoding without it gives. An -O2 artifact needs '
                        '--max-logits-rows at compile time (default: off)')
    p.add_argument("--kv-offload-cpu-gb", type=_positive_float, metavar="GB",
                   help="keep KV blocks of computed prefixes in this much host memory too, and "
                        "load them back on a prefix hit the device no longer holds (default: "
                        "off; 4 when a lower tier is named)")
    p.add_argument("--kv-offload-dir", metavar="PATH",
                   help="a third KV tier below host memory: one file per block in PATH (shared "
                        "by every process serving the same artifact; blocks left by an earlier "
                        "run are reused)")
    p.add_argument("--kv-offload-dir-gb", type=_positive_float, metavar="GB",
                   help="the most block files --kv-offload-dir keeps, in GiB; the least "
                        "recently used are deleted for room (default: 64; counted in "
                        "braze_kv_offload_lower_evictions_total)")
    p.add_argument("--kv-offload-s3", metavar="s3://BUCKET/PREFIX",
                   help="a third KV tier in an S3-compatible object store, through boto3 "
                        "(credentials, region and AWS_ENDPOINT_URL from the usual AWS "
                        "environment variables)")
    p.add_argument("--max-cpu-loras", type=_positive_int, metavar="N",
                   help="LoRA adapters kept parsed in host memory (default and minimum: the "
                        "artifact's --lora-slots); more are read from disk again when used")
    p.add_argument("--sampler", choices=SAMPLERS, default="torch",
                   help="how a step samples at temperature > 0: torch (about 116 torch "
                        "ops on the device, 139 and a sort of every row with top-k/top-p/"
                        "min-p; default) or triton (one fused kernel, JIT-compiled on the GPU "
                        "at first use, top-k/top-p/min-p included without a sort; the same "
                        "counter-based noise, so the same tokens). Greedy steps take one "
                        "argmax either way")
    p.add_argument("--collective-timeout", type=_positive_float, default=300.0,
                   metavar="SECONDS", dest="collective_timeout_s",
                   help="tensor-parallel artifacts: how long a collective waits for the other "
                        "ranks before the run ends with an error naming what failed (a rank that "
                        "died or hangs; default 300)")
    _trust_flags(p)


def _engine_options(a):
    from braze.runtime.options import EngineOptions, take_vllm_fixed
    take_vllm_fixed({"enable_chunked_prefill": a.enable_chunked_prefill})
    return EngineOptions(backend=a.backend, device=a.device, num_kv_blocks=a.num_kv_blocks,
                         gpu_memory_utilization=a.gpu_memory_utilization,
                         block_size=a.block_size, max_model_len=a.max_model_len,
                         max_num_seqs=a.max_num_seqs, max_num_tokens=a.max_num_tokens,
                         buckets=a.buckets, cudagraph_mode=a.cudagraph_mode,
                         enable_prefix_caching=a.enable_prefix_caching,
                         async_scheduling=a.async_scheduling,
                         fused_prepare=a.fused_prepare, debug=a.debug,
                         trusted_keys=a.trusted_keys, trust_artifact=a.trust_artifact,
                         kv_offload_cpu_gb=a.kv_offload_cpu_gb, kv_offload_dir=a.kv_offload_dir,
                         kv_offload_dir_gb=a.kv_offload_dir_gb,
                         kv_offload_s3=a.kv_offload_s3, max_cpu_loras=a.max_cpu_loras,
                         speculative=a.speculative, collective_timeout_s=a.collective_timeout_s,
                         sampler=a.sampler,
                         generation_config=getattr(a, "generation_config", "vllm"),  # serve's flag
                         override_generation_config=getattr(a, "override_generation_config",
                                                            None),
                         reasoning_parser=getattr(a, "reasoning_parser", None),   # serve's flag
                         scheduling_policy=a.scheduling_policy)


def _server_options(a):
    """serving/options.ServerOptions from `braze serve`'s flags (checked there)."""
    from braze.serving.options import (ServerOptions, api_keys_from, name_list,
                                       runtime_lora_updating_from)
    keys, _ = api_keys_from(a.api_key)
    return ServerOptions(
        host=a.host, port=a.port, max_queue=a.max_queue, served_model_name=_one_or_list(a.served_model_name),
        drain_timeout=a.drain_timeout, log_level=a.log_level, read_timeout=a.read_timeout,
        engine_iteration_timeout=a.engine_iteration_timeout,
        limit_concurrency=a.limit_concurrency, allowed_hosts=a.allowed_hosts,
        max_request_body_bytes=a.max_request_body_bytes, api_keys=keys,
        allowed_origins=name_list(a.allowed_origins),
        allowed_methods=name_list(a.allowed_methods) or ["*"],
        allowed_headers=name_list(a.allowed_headers) or ["*"],
        allow_credentials=a.allow_credentials, tool_call_parser=a.tool_call_parser,
        enable_auto_tool_choice=a.enable_auto_tool_choice,
        trust_request_chat_template=a.trust_request_chat_template,
        chat_template=a.chat_template,
        extensions=list(a.extension or []), lora_modules=list(a.lora_modules or []),
        allow_runtime_lora_updating=runtime_lora_updating_from(a.allow_runtime_lora_updating), enable_lora=a.enable_lora,
        max_loras=a.max_loras, max_lora_rank=a.max_lora_rank,
        enable_prompt_tokens_details=a.enable_prompt_tokens_details,
        default_chat_template_kwargs=a.default_chat_template_kwargs,
        enable_responses_store=a.enable_responses_store,
        responses_store_size=a.responses_store_size)


def _take_artifact(a) -> None:
    """`braze serve --served-model-name NAME... ARTIFACT`: the names (nargs +, as vLLM's)
    took ARTIFACT too; it is their last word."""
    if a.artifact is None:
        names = a.served_model_name or []
        if len(names) < 2:
            raise BrazeError("braze serve needs ARTIFACT, an artifact directory (braze "
                             "compile MODEL_DIR -o ARTIFACT)")
        a.artifact = names.pop()


def _one_or_list(values: list[str] | None):
    """An nargs="+" flag's values: None, one value, or the list of several."""
    return values if values is None or len(values) > 1 else values[0]


def _trust_flags(p: argparse.ArgumentParser, run: bool = True) -> None:
    p.add_argument("--trusted-keys", metavar="DIR",
                   help="a directory of Ed25519 public keys (*.pub or *.pem, PEM or OpenSSH) "
                   "whose signed artifacts are trusted, besides ~/.config/braze/trusted-keys "
                   "(which holds your own key, so what you compile yourself needs no flag). An "
                   "artifact no trusted key signed runs only if this braze regenerates its "
                   "launch plans and kernels byte for byte")
    if run:
        p.add_argument("--trust-artifact", action="store_true",
                       help="run the artifact's kernel sources, launch plans and cubins even "
                       "though no trusted key signed it and this braze cannot regenerate them "
                       "(like transformers' trust_remote_code: only for artifacts whose source "
                       "you trust; logged as a warning)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="braze", description="braze: an ahead-of-time compiler and serving runtime for LLM "
        "inference. Compile a Hugging Face model directory (or a .gguf file) once, then generate "
        "from the artifact.")
    p.add_argument("--version", action="version", version=f"braze {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a Hugging Face model directory or a .gguf "
                       "file into an artifact",
                       description="Trace MODEL (a Hugging Face directory: config.json + "
                       "*.safetensors; or a llama.cpp/Ollama .gguf file) into braze IR and write "
                       "a self-contained artifact directory.")
    c.add_argument("model_dir", metavar="MODEL",
                   help="a Hugging Face model directory (config.json, *.safetensors, tokenizer "
                        "files; fp8 e4m3 block-scaled weights are dequantized to --dtype), "
                        "or a .gguf file (llama, with Mistral and Mixtral, qwen2, qwen3, "
                        "qwen3moe, phi3, gemma3; F32/F16/BF16, Q8_0, Q4_0, "
                        "Q4_1, Q5_0, Q5_1, Q2_K..Q6_K and IQ1_S..IQ4_XS weights, dequantized "
                        "to --dtype)")
    c.add_argument("-o", "--output", required=True, metavar="ARTIFACT", help="artifact directory to write")
    c.add_argument("-O", "--opt-level", type=int, default=2, choices=(0, 1, 2),
                   help="0: the traced graph as is; 1: canonicalisation; 2: every fusion pass, "
                   "segments and memory plan (default); -O0, -O1, -O2 for short")
    c.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                   help="weights and compute dtype (default auto: the checkpoint's; for a "
                        "quantized GGUF, float16; bfloat16 for Gemma 3, whose activations "
                        "overflow float16)")
    c.add_argument("--max-num-tokens", type=_positive_int, default=8192,
                   help="most tokens in one step (recorded for the runtime; default 8192)")
    c.add_argument("--max-num-seqs", type=_positive_int, default=256,
                   help="most sequences in one step (recorded for the runtime; default 256)")
    c.add_argument("--max-model-len", type=_positive_int,
                   help="longest sequence, prompt + output (default: max_position_embeddings; "
                        "at most that, or what a YaRN or linear RoPE extends it to, as vLLM)")
    c.add_argument("--block-size", type=_positive_int, default=16, help="KV-cache block size in tokens (default 16)")
    c.add_argument("--max-logits-rows", type=_positive_int, metavar="N",
                   help="most rows the LM head computes in one step at -O2 (default: "
                        "--max-num-seqs, one per sequence). Speculative decoding with k "
                        "proposed tokens scores k + 1 rows per sequence: give "
                        "max-num-seqs * (k + 1) to verify every sequence in every step. "
                        "prompt_logprobs (and echo with logprobs) need a row per prompt "
                        "position: a step computes at most N, so with fewer rows a long prompt "
                        "takes more prefill steps; --max-num-tokens serves any chunk whole")
    c.add_argument("--targets", default="sm_80,sm_90", metavar="sm_XY,...",
                   help="GPU architectures to compile the kernels' cubins for, comma-separated "
                        "(default sm_80,sm_90: A100 and H100/H200; '' for none, and the kernels "
                        "JIT-compile on the GPU at first use). Cubins run only under the Triton "
                        "version that built them: compile with your GPU fleet's Triton")
    c.add_argument("--cudagraph-mode", default=CompileOptions.cudagraph_mode,
                   choices=CUDAGRAPH_MODES,
                   help="how the cuda backend captures CUDA graphs: none (launch the plans "
                        "eagerly), piecewise (one graph per run of ops between graph breaks "
                        "such as attention, which launches eagerly between them), full (one "
                        "graph for each whole step, prefill and decode alike, attention "
                        "included; piecewise where an op reads the step on the host). "
                        "Default: %(default)s")
    c.add_argument("--lora-slots", type=int, default=0, metavar="K",
                   help="make the artifact LoRA-capable: K adapters can be on the device at once "
                        "and mixed in one batch (adapter weights are run-time pools, not baked "
                        "in; default 0: no LoRA, the graph is unchanged)")
    c.add_argument("--max-lora-rank", type=_positive_int, default=16, metavar="R",
                   help="the largest adapter rank the artifact serves (default 16; with "
                        "--lora-slots)")
    c.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", metavar="q,k,...",
                   help="which linears get a LoRA delta, comma-separated from q,k,v,o,gate,up,"
                        "down (default: all seven; with --lora-slots); qkv and gate_up stand "
                        "for their parts (Phi-3's fused projections, whose adapters braze "
                        "splits). An adapter may target only these")
    c.add_argument("--tensor-parallel-size", type=_positive_int, default=1, metavar="N",
                   help="shard the model over N GPUs (default 1): attention heads, MLP and "
                        "expert intermediate sizes and the vocabulary split across ranks, with "
                        "all-reduce/all-gather ops in the graph; the artifact holds each rank's "
                        "weight shards, and `braze generate`/`serve` start N worker processes "
                        "(or run under torchrun). See docs/parallelism.md")
    c.add_argument("--expert-parallel", action="store_true",
                   help="with --tensor-parallel-size N > 1, for mixture-of-experts models: "
                        "place whole experts on ranks (rank r holds experts [r*E/N, "
                        "(r+1)*E/N), E divisible by N) instead of splitting every expert's "
                        "intermediate size; every rank routes all tokens and runs only its "
                        "experts, one all-reduce per MoE layer sums them. Attention stays "
                        "tensor-parallel. See docs/parallelism.md")
    c.add_argument("--small-m-gemm", choices=SMALL_M_GEMM, default="extern",
                   help="how linear layers run at batch buckets of T <= 16 tokens (decode): "
                        "extern (default) calls torch/cuBLAS at every bucket; triton launches "
                        "braze's split-K skinny GEMM kernel there and cuBLAS above. Opt-in "
                        "until measured on a GPU (benchmarks/kernel_bench.py --kernels "
                        "skinny_gemm); `braze inspect` lists the linears it applies to. At "
                        "--tensor-parallel-size N each rank runs it on its weight shards")
    c.add_argument("--mtp-assistant", metavar="DIR",
                   help="a Gemma 4 target's assistant model (a Gemma4AssistantForCausalLM "
                        "checkpoint directory): compiled beside the target, it reads the "
                        "target's last hidden state and KV cache and proposes tokens for "
                        "--speculative '{\"method\": \"mtp\", \"num_speculative_tokens\": k}'")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after tracing and after each pass into DIR "
                   "(00-traced.bir, 01-canonicalize.bir, ...; an earlier dump's NN-*.bir "
                   "files there are replaced)")
    c.add_argument("--explain", action="store_true",
                   help="say why each near-miss fusion was refused")
    c.add_argument("--sign", metavar="KEY",
                   help="sign the artifact with this Ed25519 private key file (PEM or OpenSSH; "
                   "make one with `openssl genpkey -algorithm ed25519 -out KEY`) instead of "
                   "your per-user key (~/.config/braze/signing-key.pem, made on first use); "
                   "hosts that trust its public key run the artifact's kernels and cubins as "
                   "they are")
    c.add_argument("--force", action="store_true", help="replace ARTIFACT if it exists")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    c.set_defaults(fn=cmd_compile)

    g = sub.add_parser("generate", help="generate tokens from an artifact",
                       description="Generate a completion for one prompt. Greedy by default.")
    g.add_argument("artifact", metavar="ARTIFACT", help="an artifact directory (braze compile)")
    g.add_argument("--prompt", metavar="TEXT", help="prompt text (needs the artifact's tokenizer)")
    g.add_argument("--prompt-file", metavar="FILE",
                   help="read the prompt text from FILE, or from standard input for - (taken "
                        "as it is, trailing newline included)")
    g.add_argument("--prompt-ids", type=_token_ids, metavar="1,2,3", help="prompt token ids")
    g.add_argument("--lora", metavar="DIR",
                   help="generate with this LoRA adapter (a PEFT directory; the artifact needs "
                        "--lora-slots)")
    g.add_argument("--max-tokens", type=_positive_int, default=16, metavar="N",
                   help="tokens to generate (default 16)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample from the smallest set of likeliest tokens whose probabilities "
                        "add up to P (default 1 = all)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample from the K likeliest tokens (default 0 = no limit)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this fraction of the likeliest one "
                        "(0 = off, the default)")
    g.add_argument("--seed", type=int, help="seed for sampling: the same seed, prompt and "
                   "options give the same output (default: a different sample each run)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    g.add_argument("--stop", action="append", metavar="TEXT", type=_escaped,
                   help="stop when this text appears (not included in the output); repeatable; "
                        "\\n, \\t, \\r and \\\\ are read as newline, tab, return and backslash")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X",
                   help="OpenAI presence penalty, -2..2 (default 0 = none)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                   help="OpenAI frequency penalty, -2..2 (default 0 = none)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                   help="vLLM/HF repetition penalty over prompt and output (default 1 = none)")
    g.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="generate at least this many tokens before EOS or a stop token "
                        "(default 0)")
    g.add_argument("--logprobs", type=int, metavar="N",
                   help="with --json: each token's logprob, rank and the N most likely")
    g.add_argument("-n", "--n", type=_positive_int, default=1,
                   help="samples to generate (one line or JSON object each; default 1)")
    g.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ...}')
    _engine_flags(g, "what the GPU's free memory holds, or up to 1 GiB on the CPU")
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("inspect", help="summarise an artifact",
                       description="Summarise an artifact: the model, the compile options, "
                       "the graph after the passes, the launch plan, the stored cubins and "
                       "whether this host would launch them, and who signed it. Nothing in "
                       "the artifact runs.")
    i.add_argument("artifact", metavar="ARTIFACT", help="an artifact directory (braze compile)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--kernels", action="store_true",
                   help="also read every stored cubin (with the cuobjdump Triton ships; no "
                        "GPU needed): registers per thread, spilled bytes, shared memory, "
                        "resident warps per SM and what limits them, and the widths of its "
                        "global loads and stores")
    i.add_argument("--no-verify", action="store_true", help="skip checking file hashes")
    _trust_flags(i, run=False)
    i.set_defaults(fn=cmd_inspect)

    o = sub.add_parser("opt", help="run passes on IR text (like mlir-opt)",
                       description="Read IR text (FILE or - for stdin), verify it, run --passes "
                       "in order (verifying after each), print it. --passes '' prints the graph "
                       "unchanged. --list-passes names every pass, its stage and level, and the "
                       "compile options it reads (give them with --set).")
    o.add_argument("file", metavar="FILE.bir", nargs="?",
                   help="IR text to read, or - for standard input")
    o.add_argument("--list-passes", action="store_true",
                   help="list the passes (in -O2 order, then those run only when named) and exit")
    o.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a compile option for the passes that read it, as braze compile's flag "
                        "would set it (e.g. tensor_parallel_size=2 for shard, max_model_len=4096 "
                        "for tabulate-positions); repeat for several")
    o.add_argument("--passes", default="",
                   help="comma-separated pass names (default: none, the graph printed as read)")
    o.add_argument("--print-after-all", action="store_true", help="print the IR after each pass")
    o.add_argument("--explain", action="store_true", help="say why near-miss fusions were refused")
    o.add_argument("--stats", action="store_true", help="matches and time per pass (on stderr)")
    o.add_argument("--max-num-tokens", type=_positive_int, help="for plan-memory (default 8192)")
    o.add_argument("--cudagraph-mode", choices=CUDAGRAPH_MODES,
                   help="for split-segments (default piecewise)")
    o.set_defaults(fn=cmd_opt)

    s = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API",
                       description="Serve ARTIFACT over HTTP: /v1/completions, "
                       "/v1/chat/completions, /v1/responses, /invocations, /v1/models, /tokenize, /detokenize, /server_info, /health, "
                       "/ping, /load, /version, /metrics. "
                       "SIGTERM drains in-flight requests, then exits.")
    # optional to argparse only: `--served-model-name NAME... ARTIFACT` takes it (_take_artifact)
    s.add_argument("artifact", metavar="ARTIFACT", nargs="?",
                   help="an artifact directory (braze compile)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--lora-modules", nargs="+", action="extend", metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) to load at start, as NAME=PATH or "
                        "vLLM's JSON '{\"name\": ..., \"path\": ..., \"base_model_name\": "
                        "...}'; repeatable; a request picks one with \"model\": NAME (the "
                        "artifact needs --lora-slots)")
    s.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="answer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they "
                        "read any adapter path the server can; off by default; vLLM's "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=true in the environment turns them "
                        "on too)")
    s.add_argument("--enable-lora", action="store_true",
                   help="vLLM's flag, checked: the artifact must serve LoRA adapters (braze "
                        "compiles them in: braze compile --lora-slots K --max-lora-rank R)")
    s.add_argument("--max-loras", type=_positive_int, metavar="K",
                   help="vLLM's flag: the adapters one batch may hold, at most the artifact's "
                        "--lora-slots (default: all of them)")
    s.add_argument("--max-lora-rank", type=_positive_int, metavar="R",
                   help="vLLM's flag, checked: at most the artifact's --max-lora-rank")
    s.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, metavar="N",
                   help="vLLM's flag, checked: the artifact's --tensor-parallel-size (braze "
                        "compiles the split in, and serve starts the artifact's N ranks "
                        "itself)")
    s.add_argument("--enable-expert-parallel", "-ep", action="store_true",
                   help="vLLM's flag, checked: the artifact was compiled with "
                        "--expert-parallel")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--max-queue", type=_positive_int, default=256, metavar="N",
                   help="most requests waiting for the running batch; more get 503 (default 256)")
    s.add_argument("--served-model-name", metavar="NAME", nargs="+",
                   help="the model name clients use (default: the artifact directory's name); "
                   "as in vLLM, several names are each answered, and responses give the first")
    s.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds to let in-flight requests finish (default 30)")
    s.add_argument("--engine-iteration-timeout", type=float, default=60.0, metavar="S",
                   help="seconds one engine step may run; a longer one makes /health and "
                   "/ping answer 503 (a hung engine) until it returns (default 60, as vLLM's "
                   "VLLM_ENGINE_ITERATION_TIMEOUT_S)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="the server's log level (default info)")
    s.add_argument("--read-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client may take to send a request's headers, and again its "
                   "body; slower clients are disconnected (default 30)")
    s.add_argument("--limit-concurrency", type=_positive_int, default=1024, metavar="N",
                   help="most open connections and requests at once; more get 503 (default 1024)")
    s.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated Host header names to answer (*.example.com for "
                   "subdomains, * for any). Bound to loopback (the default) the server answers "
                   "only localhost and loopback addresses, so web pages cannot reach it through "
                   "DNS rebinding; bound elsewhere it answers any name unless this is given")
    s.add_argument("--tool-call-parser", metavar="NAME",
                   help="how to read tool calls out of replies for tool_choice \"auto\": "
                   "hermes (Qwen), llama3_json, mistral, deepseek_v3, phi4_mini_json, internlm, "
                   "gemma4 (default: the one the chat template's markers point to, if any)")
    s.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage.prompt_tokens_details.cached_tokens in completions and chat "
                   "responses: the prompt tokens the prefix cache (or a KV tier) served, as "
                   "vLLM's flag adds it")
    s.add_argument("--default-chat-template-kwargs", metavar="JSON",
                   help="chat template keywords every chat request gets, under its own "
                   "chat_template_kwargs (vLLM's flag), e.g. '{\"enable_thinking\": false}' "
                   "to serve a Qwen3 without reasoning unless a request asks for it")
    s.add_argument("--enable-responses-store", action="store_true",
                   help="keep /v1/responses by id, in memory: previous_response_id goes on "
                   "with a stored conversation, background: true runs a reply to poll, GET and "
                   "DELETE /v1/responses/{id} answer (vLLM's VLLM_ENABLE_RESPONSES_API_STORE=1 "
                   "turns it on too). Default: off, and a request's store: true keeps nothing, "
                   "as in vLLM")
    s.add_argument("--responses-store-size", type=_positive_int, default=1000, metavar="N",
                   help="with --enable-responses-store, the most responses kept; the oldest "
                   "finished one is forgotten first (default 1000)")
    s.add_argument("--reasoning-parser", metavar="NAME",
                   help="split chat replies of a reasoning model into `reasoning` and "
                   "`content` (as vLLM's flag does), and hold response_format / tool_choice "
                   "grammars back until the reasoning ends: qwen3, deepseek_r1, deepseek_v3 "
                   "(<think>...</think>), gemma4 (<|channel>...<channel|>), mistral "
                   "([THINK]...[/THINK]). Default: none, replies are all content")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's flag, checked: braze reads tool calls for tool_choice \"auto\" "
                   "whenever it has a parser; with this flag the server does not start "
                   "without one (--tool-call-parser, or the chat template's markers)")
    s.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="the model's sampling defaults, for what a request leaves unset "
                   "(temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens "
                   "as the token limit): auto reads the artifact's generation_config.json (the "
                   "checkpoint's, as vLLM does by default), vllm uses none (the API's: "
                   "temperature 1, no top-k/top-p), DIR reads DIR/generation_config.json "
                   "(default: auto)")
    s.add_argument("--override-generation-config", metavar="JSON",
                   help='sampling defaults over the generation config\'s, e.g. '
                   '\'{"temperature": 0.5, "top_p": 0.9}\' (the keys above)')
    s.add_argument("--max-request-body-bytes", type=_positive_int, metavar="N",
                   default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                   help="largest request body accepted; bigger gets 413 (default "
                   f"{DEFAULT_MAX_REQUEST_BODY_BYTES}, 4 MiB: about a million tokens of text)")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health, "
                   "/ping, /load, /version and /metrics (401 otherwise); repeatable for several keys. "
                   "Default: $BRAZE_API_KEY, else $VLLM_API_KEY, else no key. Prefer the "
                   "environment: a flag shows in the process list")
    s.add_argument("--allowed-origins", metavar="ORIGINS",
                   help="CORS: origins whose web pages may call the API, comma-separated or "
                   "a JSON list, e.g. https://app.example.com or '*' (default: none, no CORS "
                   "headers; vLLM's default is '*')")
    s.add_argument("--allowed-methods", metavar="METHODS",
                   help="CORS: methods allowed to those origins (default *)")
    s.add_argument("--allowed-headers", metavar="HEADERS",
                   help="CORS: request headers allowed to those origins (default *)")
    s.add_argument("--allow-credentials", action="store_true",
                   help="CORS: let those origins send cookies and Authorization (needs "
                   "--allowed-origins to list origins, not '*')")
    s.add_argument("--chat-template", metavar="FILE|TEXT",
                   help="the chat template for /v1/chat/completions and /tokenize instead of "
                   "the model's (or for a model without one): a Jinja file, or the template "
                   "text itself, as vLLM's flag")
    s.add_argument("--trust-request-chat-template", action="store_true",
                   help="let chat requests bring their own Jinja chat_template (rendered in a "
                   "sandbox, but a template can burn CPU: only for trusted clients; without "
                   "this flag such a request gets 400)")
    s.add_argument("--extension", action="append", metavar="MODULE:FUNCTION|NAME",
                   help="call FUNCTION(app) at start-up to add routes or middleware to the "
                   "FastAPI app; NAME: an entry point of the group braze.serve_extensions. "
                   "Repeatable (docs/serving.md)")
    _engine_flags(s, "what the GPU's free memory holds, or up to 1 GiB on the CPU")
    from braze import vllm_serve_flags
    vllm_serve_flags.add_to(s)        # a vLLM command line's flags: taken, or refused saying why
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", help="build a tiny random model, compile it and generate (CPU, seconds)")
    d.add_argument("--max-tokens", type=_positive_int, default=16, metavar="N",
                   help="tokens to generate (default 16)")
    d.add_argument("--keep", metavar="DIR", help="keep the model and artifact in DIR")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except BrazeError as e:
        print(f"braze: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("braze: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `braze inspect ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug in braze, not the user's fault: one line unless debugging
        if os.environ.get("BRAZE_DEBUG"):
            raise
        print(f"braze: internal error: {type(e).__name__}: {e} (a bug in braze; rerun with "
              f"BRAZE_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
