"""`vllm serve` flags on a `braze serve` command line, pasted from a vLLM deployment.

Those for what braze does anyway are taken (TAKEN); those for what the artifact fixed
(-tp, --enable-expert-parallel, --enable-lora, ...) are braze serve's own flags, checked
against it (braze/cli.py). Those braze has no use for are refused,
each naming the flag and the braze way to what it asked for (REFUSED), where argparse
alone said only "unrecognized arguments". Both are hidden from --help.
"""

from __future__ import annotations

import argparse

_ARTIFACT = ("braze serve runs a compiled artifact: braze compile MODEL_DIR -o ARTIFACT, "
             "then braze serve ARTIFACT")
_COMPILED_DTYPE = ("the dtype of the weights and the KV cache is chosen when the artifact is "
                   "compiled: braze compile MODEL_DIR -o ARTIFACT --dtype bfloat16")

# flag (and its aliases) -> what to do instead
REFUSED = {
    ("--dtype",): _COMPILED_DTYPE,
    ("--kv-cache-dtype",): _COMPILED_DTYPE,
    ("--quantization", "-q"): "quantized checkpoints (fp8, GGUF) are read by braze compile; "
                              "braze serve runs what the artifact holds",
    ("--pipeline-parallel-size", "-pp"): "braze has no pipeline parallelism; compile with "
                                         "--tensor-parallel-size N",
    ("--distributed-executor-backend",): "braze serve starts its N ranks itself (one process "
                                         "each), or joins them under torchrun "
                                         "(docs/parallelism.md)",
    ("--speculative-model", "--num-speculative-tokens"): (
        "vLLM's older flags; give --speculative-config '{\"model\": DRAFT_ARTIFACT, "
        "\"num_speculative_tokens\": 3}' (or \"method\": \"ngram\" / \"mtp\")"),
    ("--data-parallel-size", "-dp"): "run one braze serve per replica behind a load balancer",
    ("--enforce-eager",): "use --cudagraph-mode none",
    ("--max-seq-len-to-capture",): "the step sizes captured as CUDA graphs are --buckets",
    ("--trust-remote-code",): "braze serve loads no model code (the artifact is data): leave "
                              "it out",
    ("--tokenizer",): "the artifact carries its checkpoint's tokenizer: leave it out",
    ("--model", "--revision", "--download-dir", "--load-format"): _ARTIFACT,
    ("--seed",): "give a request its own seed (its seed field)",
    ("--uvicorn-log-level",): "use --log-level",
    ("--disable-log-requests",): "use --log-level warning (each request's line is logged at "
                                 "info)",
    ("--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs"): "braze serve speaks plain HTTP: "
                                                           "put TLS in a reverse proxy in "
                                                           "front of it",
    ("--swap-space",): "braze recomputes preempted requests; --kv-offload-cpu-gb keeps "
                       "computed prefixes in host memory",
    ("--cpu-offload-gb",): "braze keeps every weight on the device",
}

# vLLM's switches for what braze always does: taken, and they change nothing
# (--enable-auto-tool-choice is braze serve's own flag on the main branch: not here)
TAKEN = (
    "--disable-log-stats",         # braze logs no periodic stats
)


class _Refuse(argparse.Action):
    def __init__(self, option_strings, dest, advice: str, **kwargs):
        self.advice = advice
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is vLLM's flag, which braze serve does not take: "
                     f"{self.advice}")


def add_to(parser: argparse.ArgumentParser) -> None:
    """Register TAKEN and REFUSED on `parser` (braze serve's), hidden from its help."""
    for flags, advice in REFUSED.items():
        parser.add_argument(*flags, action=_Refuse, advice=advice,
                            dest="vllm_" + flags[0].lstrip("-").replace("-", "_"))
    for flag in TAKEN:
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
