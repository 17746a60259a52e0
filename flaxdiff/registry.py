"""A tiny name -> factory registry shared by schedules, predictors, losses, samplers, grids and models, and the one
``to_config`` helper their members use."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; ``get`` builds a member, unknown names and bad arguments raise ``ValueError``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T]) -> Callable[..., T]:
        """Register ``factory`` under ``name``; returns the factory so this can be used as a decorator helper.
        A name is registered once: a second registration raises instead of silently replacing the first."""
        if name in self._factories:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self._factories[name] = factory
        return factory

    def available(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def check(self, name: str) -> None:
        """Raise ``ValueError`` naming ``name`` and the available members unless it is registered."""
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.available())}")

    def get(self, name: str, **kwargs: Any) -> T:
        self.check(name)
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


def to_config(obj: Any, name: str | None = None, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """``{"name": name, field: value, ...}`` of a dataclass member, JSON-serialisable (tuples become lists), the
    input of ``Registry.from_config``. ``name`` defaults to ``obj.name``; fields in ``exclude`` are left out."""
    skipped = set(exclude)
    config: dict[str, Any] = {"name": obj.name if name is None else name}
    for field in dataclasses.fields(obj):
        if field.name not in skipped:
            value = getattr(obj, field.name)
            config[field.name] = list(value) if isinstance(value, tuple) else value
    return config
