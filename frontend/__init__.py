"""Frontend: Hugging Face model directory (or a GGUF file, read as one: gguf.py) -> braze IR
(torch.fx over models/), plus weights."""

from .load import LoadedModel, load_model, parse_dtype

__all__ = ["LoadedModel", "load_model", "parse_dtype"]
