"""One registry type for everything built by name (models, encoders, protocols, ...).

    MODELS = Registry("model")

    @MODELS.register("unet")
    def build_unet(**kwargs): ...

    MODELS.get("unet")      # -> the builder; an unknown name raises UnknownNameError (a KeyError)
                            #    listing every valid name
    MODELS.names()          # sorted names
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, TypeVar

from fewshot_proto.errors import UnknownNameError

T = TypeVar("T", bound=Callable[..., Any])


class Registry:
    """A name -> builder mapping that fails loudly in both directions.

    Registering a name twice raises ``ValueError``; asking for an unknown name raises ``UnknownNameError`` (a
    ``KeyError``) whose message lists every registered name.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``fn`` under ``name`` (default: ``fn.__name__``)."""

        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered (by {self._items[key]!r})")
            self._items[key] = fn
            return fn

        return deco

    def add(self, name: str, fn: Callable[..., Any]) -> None:
        """Register ``fn`` under ``name`` without a decorator."""
        self.register(name)(fn)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(self.names()) or "(none registered)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """``get(name)(**kwargs)``."""
        return self.get(name)(**kwargs)

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
