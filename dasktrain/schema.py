"""What a model needs to know about a dataset: field shapes and dtypes.

Pure Python; shared by ``data`` (which produces it) and ``models`` (which
check it), so that neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FieldInfo", "Schema"]


@dataclass(frozen=True)
class FieldInfo:
    """One dataset array: per-row shape (``()`` for a vector) and dtype name."""

    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FieldInfo:
        return cls(tuple(int(s) for s in obj["shape"]), str(obj["dtype"]))


@dataclass(frozen=True)
class Schema:
    """Fields of a dataset, by name (``"X"``, ``"y"``, ...)."""

    fields: dict[str, FieldInfo]

    @property
    def n_features(self) -> int:
        """Width of ``X`` (0 if the dataset has no ``X``)."""
        x = self.fields.get("X")
        if x is None:
            return 0
        return int(x.shape[0]) if x.shape else 1

    def to_json(self) -> dict[str, Any]:
        return {name: info.to_json() for name, info in sorted(self.fields.items())}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Schema:
        return cls({name: FieldInfo.from_json(v) for name, v in obj.items()})
