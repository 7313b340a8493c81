"""The stages' typed contracts: frozen dataclasses of parameters and manifests that travel as JSON
between steps (Airflow XCom, the containers' `--input`). `Contract.to_json` / `from_json` round-trip
them, nested contracts and tuples included; a stage's cache key is computed from its params object
(`cache_key`), never from a second list of its arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from pathlib import Path


class Contract:
    """Mixin of a frozen dataclass whose fields are JSON values, Paths, tuples or other contracts."""

    def to_json(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: dict):
        if isinstance(data, cls):
            return data
        hints = _hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _typed(hints[k], v) for k, v in data.items() if k in names})

    @classmethod
    def settings_of(cls, source, **inputs):
        """An instance whose fields are read from `source`'s same-named attributes (the run's config),
        with `inputs` (upstream manifests, renamed settings) given explicitly."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in inputs and hasattr(source, f.name)]
        return cls(**{n: _typed(_hints(cls)[n], getattr(source, n)) for n in names}, **inputs)


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _plain(value):
    if isinstance(value, Contract):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _typed(hint, value):
    """`value` (from JSON) as the annotated type: contracts built, lists to tuples, str to Path."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _typed(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        args = typing.get_args(hint)
        return tuple(_typed(args[0], v) for v in value) if args else tuple(value)
    if isinstance(hint, type) and issubclass(hint, Contract) and isinstance(value, dict):
        return hint.from_json(value)
    if hint is Path:
        return Path(value)
    return value
