"""Reading weight files: the one safe reader behind checkpoints, pretrained encoders and fine-tuning bases.

``read_torch_file(path, what)`` loads a ``torch.save`` file with ``weights_only=True`` (never unpickling code) and
turns every way it can fail into a one-line ``CheckpointError`` naming the file: missing, empty, not a zip archive
(corrupt or truncated), unreadable, or holding objects the weights-only unpickler refuses. ``state_dict_of(obj,
path, what)`` takes the state dict out of what such a file holds: a fewshot_proto checkpoint (``{"model": state,
"model_name": ..., "model_config": ...}``), a ``{"state_dict": state}`` file or a bare state dict.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

import torch

from fewshot_proto.errors import CheckpointError

__all__ = ["StateFile", "read_torch_file", "state_dict_of", "read_state_file"]


def read_torch_file(path: Union[str, Path], what: str = "checkpoint",
                    map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a ``CheckpointError`` ``"<what> <path> ..."`` on any failure."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{what} {path} is corrupt or truncated (not a torch.save zip archive)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    except Exception as e:  # the weights-only unpickler raises UnpicklingError for foreign objects
        raise CheckpointError(f"{what} {path} cannot be read safely with weights_only=True "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


class StateFile(NamedTuple):
    """A state dict and, when the file was a fewshot_proto checkpoint, the model's name and config."""

    state: Dict[str, torch.Tensor]
    model_name: Optional[str]
    model_config: Optional[Dict[str, Any]]


def state_dict_of(obj: Any, path: Union[str, Path], what: str = "weights file") -> StateFile:
    """The state dict in ``obj`` (what ``read_torch_file`` returned), see the module docstring."""
    name: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        name = obj.get("model_name")
        config = dict(obj["model_config"]) if isinstance(obj.get("model_config"), Mapping) else None
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{what} {path} does not contain a state dict (a mapping of names to tensors)")
    return StateFile(state=dict(obj), model_name=name, model_config=config)


def read_state_file(path: Union[str, Path], what: str = "weights file") -> StateFile:
    """``state_dict_of(read_torch_file(path, what), path, what)``."""
    return state_dict_of(read_torch_file(path, what), Path(path).expanduser(), what)
