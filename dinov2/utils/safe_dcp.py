"""Reading run folders without running code from them.

A run folder travels between people like a weights file, so everything in it is untrusted input.
``torch.distributed.checkpoint`` (DCP) reads ``.metadata`` with a plain ``pickle.load`` and the
non-tensor items of a checkpoint (optimizer hyper-parameters …) with ``torch.load(weights_only=False)``:
either would run whatever a crafted file asks for.  Here:

* ``.metadata`` goes through an unpickler that resolves only the classes DCP metadata is made of
  (its dataclasses, ``torch.Size``, dtypes, the layout helper, ``PosixPath``); anything else is
  refused naming the file and the class.
* non-tensor items go through ``torch.load(weights_only=True)`` (tensors already are).
* RNG states are stored as tensors and plain numbers (:func:`encode_rng_state`), so they load
  with ``weights_only=True`` too.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner


class UnsafeCheckpointError(RuntimeError):
    """A run-folder file asks for something other than what a checkpoint is made of (refused)."""


class DamagedCheckpointError(RuntimeError):
    """A run-folder file is truncated or unreadable."""


_DCP_MODULES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        if name in _DCP_MODULES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._source}: refused to load: it asks for {module}.{name}, which is not part of DCP "
            f"checkpoint metadata (a crafted file could run code this way)")


def read_dcp_metadata(ckpt_dir: str | Path):
    """``Metadata`` of a DCP folder, read with the allow-listed unpickler."""
    path = Path(ckpt_dir) / ".metadata"
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated or garbage bytes raise many types
            raise DamagedCheckpointError(f"{path}: unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from None


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with the metadata read by :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        if kwargs.get("rank") is not None:
            raise UnsafeCheckpointError(f"{self.path}: per-rank metadata files are not supported")
        metadata = read_dcp_metadata(self.path)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items are decoded with ``weights_only=True`` before DCP sees them."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"checkpoint item {read_item.dest_index.fqn!r} refused by torch.load(weights_only=True): "
                f"{_first_line(exc)}") from None
        except Exception as exc:
            raise DamagedCheckpointError(f"checkpoint item {read_item.dest_index.fqn!r} is unreadable: "
                                         f"{_first_line(exc)}") from None
        # Hand DCP a re-serialisation of the already-decoded, plain object (its own path then
        # places it in the nested state dict).
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        super().load_bytes(read_item, buf)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- RNG states
RNG_FORMAT = 2


def encode_rng_state(torch_state: torch.Tensor, cuda_states: list[torch.Tensor] | None,
                     numpy_state: tuple, python_state: tuple) -> dict[str, Any]:
    """RNG states as tensors and numbers only (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss = python_state
    return {
        "format": RNG_FORMAT,
        "torch": torch_state,
        "cuda": list(cuda_states) if cuda_states is not None else None,
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
    }


def decode_rng_state(d: dict[str, Any], source: Path) -> tuple:
    """(torch, cuda, numpy, python) states from :func:`encode_rng_state`'s dict."""
    try:
        if int(d["format"]) != RNG_FORMAT:
            raise ValueError(f"format {d['format']}")
        n, p = d["numpy"], d["python"]
        numpy_state = (n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                       float(n["cached_gaussian"]))
        python_state = (int(p["version"]), tuple(int(v) for v in p["state"].tolist()), p["gauss"])
        return d["torch"], d["cuda"], numpy_state, python_state
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedCheckpointError(f"{source}: not an RNG state file of this project ({exc})") from None


def load_rng_file(path: Path) -> tuple:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: never loaded
        raise UnsafeCheckpointError(
            f"{path}: refused by torch.load(weights_only=True) ({_first_line(exc)}); RNG files of this project hold "
            f"tensors and numbers only. Delete the rng_rank*.pt files of that checkpoint to resume "
            f"from it without its exact random state") from None
    except Exception as exc:
        raise DamagedCheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict):
        raise DamagedCheckpointError(f"{path}: not an RNG state file of this project")
    return decode_rng_state(d, path)
