"""Base class of the model configs: frozen dataclasses that round-trip through JSON.

``config.to_config()`` gives a JSON-serialisable dict ``{"name": <registry name>, <field>: <value>}``
(tuples become lists); ``flaxdiff.models.from_config(d)`` rebuilds the exact module from it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

from flaxdiff.registry import to_config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Common behaviour of every model config; subclasses set ``registry_name`` and ``make``."""

    registry_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable dict including the registry name under ``"name"``."""
        return to_config(self, name=self.registry_name)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_config` (the ``"name"`` key is ignored); unknown fields are an error."""
        names = {field.name for field in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k != "name"}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; accepted: {sorted(names)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (unknown fields are an error)."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} fields {sorted(unknown)}; accepted: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    def make(self) -> nn.Module:
        """Build the Linen module described by this config."""
        raise NotImplementedError
