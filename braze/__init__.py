"""braze: an ahead-of-time compiler and serving runtime for LLM inference.

    import braze
    art = braze.compile("./my-llama", "my-llama.braze")
    llm = braze.LLM("my-llama.braze")
    print(llm.generate(["Hello"], braze.SamplingParams(max_tokens=8))[0].text)

Imports are lazy so that a serving host loading `braze.runtime` never imports
the compiler (frontend, passes, models).
"""

__version__ = "0.1.0"

__all__ = ["compile", "LLM", "SamplingParams", "BeamSearchParams", "LoRARequest", "BrazeError",
           "__version__"]


def __getattr__(name):
    if name == "compile":
        from .compiler import compile
        return compile
    if name == "LLM":
        from braze.runtime.llm import LLM
        return LLM
    if name == "SamplingParams":
        from braze.runtime.sampler import SamplingParams
        return SamplingParams
    if name == "BeamSearchParams":
        from braze.runtime.beam_search import BeamSearchParams
        return BeamSearchParams
    if name == "LoRARequest":
        from braze.runtime.lora import LoRARequest
        return LoRARequest
    if name == "BrazeError":
        from braze.ir.errors import BrazeError
        return BrazeError
    raise AttributeError(f"module 'braze' has no attribute {name!r}")
