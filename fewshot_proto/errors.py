"""Exceptions raised by fewshot_proto. Every message names the file (or key) and the problem."""
from __future__ import annotations

__all__ = ["FewShotError", "DataError", "ProtocolError", "CheckpointError"]


class FewShotError(Exception):
    """Base class of fewshot_proto's own errors."""


class DataError(FewShotError, ValueError):
    """A dataset, volume or label file is missing, unreadable or inconsistent."""


class ProtocolError(FewShotError, ValueError):
    """An evaluation protocol or manifest cannot be built or does not match the data."""


class CheckpointError(FewShotError, RuntimeError):
    """A checkpoint is missing, corrupt, truncated or belongs to another model."""
