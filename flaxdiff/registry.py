"""A tiny name -> factory registry shared by schedules, predictors, losses, samplers and models."""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; ``get`` builds a member, unknown names and bad arguments raise ``ValueError``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T]) -> Callable[..., T]:
        """Register ``factory`` under ``name``; returns the factory so this can be used as a decorator helper."""
        self._factories[name] = factory
        return factory

    def available(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str, **kwargs: Any) -> T:
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.available())}")
        try:
            return self._factories[name](**kwargs)
        except TypeError as err:
            raise ValueError(f"bad arguments for {self.kind} {name!r}: {err}") from None

    def from_config(self, config: dict[str, Any]) -> T:
        """Rebuild a member from a ``{"name": ..., **kwargs}`` dict (the output of its ``to_config``)."""
        kwargs = dict(config)
        name = kwargs.pop("name", None)
        if name is None:
            raise ValueError(f"{self.kind} config {config!r} has no 'name'; available: {', '.join(self.available())}")
        return self.get(name, **kwargs)
