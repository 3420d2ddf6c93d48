"""Frontend: Hugging Face model directory -> braze IR (torch.fx over models/), plus weights."""

from .load import LoadedModel, load_model, parse_dtype

__all__ = ["LoadedModel", "load_model", "parse_dtype"]
