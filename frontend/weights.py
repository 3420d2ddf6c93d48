"""Read checkpoint weights from safetensors (one file or a sharded index).

Every IR parameter is found through its family's `WeightSource`, checked
against the shape the graph expects, and converted to the compile dtype.
Errors name the weight, the file and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from braze.ir.errors import BrazeError
from braze.models.registry import WeightSource


class Checkpoint:
    """Lazy access to the tensors of a Hugging Face model directory."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self._handles: dict[Path, object] = {}
        self._keys: dict[Path, set[str]] = {}      # the names each file holds, once read
        index = self.dir / "model.safetensors.index.json"
        # transformers reads model.safetensors whenever it exists, before any index (an
        # index left behind by shards merged into it names files no longer there)
        if index.exists() and not (self.dir / "model.safetensors").exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise BrazeError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise BrazeError(f"{index}: its weight_map is a {type(weight_map).__name__}, "
                                 f"not an object of tensor names to files")
            bad = next((n for n, f in weight_map.items() if not isinstance(f, str)), None)
            if bad is not None:
                raise BrazeError(f"{index}: weight_map puts {bad!r} in {weight_map[bad]!r}, "
                                 f"not a file name")
            self.files = {name: self.dir / f for name, f in weight_map.items()}
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise BrazeError(f"{self.dir}: no *.safetensors weights found (braze reads "
                                 f"safetensors only; convert .bin checkpoints first)")
            self.files = {}
            for f in shards:
                for name in self._open(f).keys():
                    self.files[name] = f

    # open files are memory-mapped, and the pages read stay resident while the map lives:
    # keeping only the latest open bounds that to one shard, not the checkpoint
    MAX_OPEN = 1

    def _open(self, path: Path):
        if path in self._handles:
            self._handles[path] = self._handles.pop(path)     # most recent last
        else:
            while len(self._handles) >= self.MAX_OPEN:
                del self._handles[next(iter(self._handles))]
            if not path.exists():
                raise BrazeError(f"{path}: weight file listed in model.safetensors.index.json "
                                 f"is missing (an interrupted download?); download the "
                                 f"checkpoint again, e.g. `huggingface-cli download` into "
                                 f"{path.parent}")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                if _is_lfs_pointer(path):
                    raise BrazeError(f"{path}: a Git LFS pointer, not the weights (the "
                                     f"repository was cloned without git-lfs); run `git lfs "
                                     f"pull` in {path.parent}, or download it with "
                                     f"`huggingface-cli download`") from None
                raise BrazeError(f"{path}: cannot read safetensors file ({e})") from None
        return self._handles[path]

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._holding(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._holding(name).get_tensor(name)

    def _holding(self, name: str, path: Path | None = None):
        """The open file (`path`, by default the one the index names) that holds `name`; a
        stale index that names another shard is the checkpoint's fault, said as such."""
        path = path or self.files[name]
        handle = self._open(path)
        if path not in self._keys:
            self._keys[path] = set(handle.keys())
        if name not in self._keys[path]:
            raise BrazeError(f"{self.dir / 'model.safetensors.index.json'} puts weight {name!r} "
                             f"in {path.name}, which does not hold it (a stale index, or shards "
                             f"from another download?)")
        return handle


def _is_lfs_pointer(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(64).startswith(b"version https://git-lfs.github.com/spec/")
    except OSError:
        return False


HEAD, EMBEDDING = "lm_head.weight", "model.embed_tokens.weight"


def head_is_tied(ckpt: Checkpoint, tied: bool) -> bool:
    """Is the LM head the embedding table? config.json's tie_word_embeddings (`tied`), unless
    the checkpoint also holds an lm_head.weight unlike the embeddings: transformers'
    from_pretrained then leaves the two untied and uses the saved head, and so does braze."""
    names = ckpt.names()
    if not tied or HEAD not in names or EMBEDDING not in names:
        return tied
    if ckpt.shape(HEAD) != ckpt.shape(EMBEDDING):
        return False
    head = ckpt.get(HEAD)
    return torch.equal(head, ckpt.get(EMBEDDING).to(head.dtype))


def check_sources(ckpt: Checkpoint, param: str, source: WeightSource, expected: tuple) -> None:
    available = ckpt.names()
    missing = [n for n in source.names if n not in available]
    if missing:
        elsewhere = sorted(n for n in available if n.endswith("." + missing[0]))
        if missing[0] == HEAD and EMBEDDING in available:
            hint = "; if the head shares the embeddings, set tie_word_embeddings to true in config.json"
        elif elsewhere:
            hint = (f"; it holds {elsewhere[0]!r}: the weights were saved under a wrapper "
                    f"model's names (a PEFT model not merged?); save the model itself "
                    f"(for PEFT: merge_and_unload(), then save_pretrained)")
        else:
            hint = ""
        raise BrazeError(f"weight {missing[0]!r} (for parameter {param}, shape "
                         f"{list(expected)}) is missing from the checkpoint in {ckpt.dir}{hint}")
    shapes = [ckpt.shape(n) for n in source.names]
    if source.kind == "stack":
        got = (len(shapes),) + shapes[0]
        bad = next((n for n, s in zip(source.names, shapes) if s != shapes[0]), None)
        if bad:
            raise BrazeError(f"weight {bad!r} has shape {list(ckpt.shape(bad))}, unlike "
                             f"{list(shapes[0])} of the other experts")
    elif source.kind == "slice":
        got = list(shapes[0])
        got[source.dim] = source.stop - source.start
        if shapes[0][source.dim] < source.stop:
            got[source.dim] = -1
        got = tuple(got)
        if source.total and shapes[0][source.dim] != source.total:
            # a part of a larger fused tensor would read as the whole, shifted
            raise BrazeError(f"weight {source.names[0]!r} has shape {list(shapes[0])}, but "
                             f"config.json makes its fused parameters {source.total} along "
                             f"dim {source.dim} (for {param} and the others it holds; does "
                             f"config.json match the weights?)")
    else:
        got = shapes[0]
    if tuple(got) != tuple(expected):
        raise BrazeError(f"weight {source.names[0]!r} has shape {list(shapes[0])}, but "
                         f"parameter {param} needs {list(expected)} (does config.json match "
                         f"the weights?)")


def load_source(ckpt: Checkpoint, source: WeightSource, dtype: torch.dtype) -> torch.Tensor:
    if source.kind == "stack":
        t = torch.stack([ckpt.get(n).to(dtype) for n in source.names])
    elif source.kind == "slice":
        t = ckpt.get(source.names[0]).narrow(source.dim, source.start, source.stop - source.start)
    else:
        t = ckpt.get(source.names[0])
    return t.to(dtype).contiguous()
