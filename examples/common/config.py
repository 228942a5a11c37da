"""YAML configs with ``_base_`` inheritance and dotted command-line overrides (the keys: ``schema.py``)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable, List, Union

import yaml

__all__ = ["load_config", "apply_overrides", "deep_merge"]


def deep_merge(base: dict, child: dict) -> dict:
    """A new dict: ``base`` updated recursively by ``child`` (nested dicts merge, anything else: child wins)."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load(path: Path, stack: List[Path]) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in stack + [path])
        raise ValueError(f"load_config: `_base_` cycle: {chain}")
    if not path.is_file():
        where = f" (the `_base_` of {stack[-1]})" if stack else ""
        raise FileNotFoundError(f"load_config: config file {path} does not exist{where}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"load_config: {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"load_config: {path} must hold a mapping at the top level, got {type(data).__name__}")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"load_config: `_base_` in {path} must be a path or a list of paths, got {bases!r}")
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, _load(path.parent / b, stack + [path]))
    return deep_merge(merged, data)


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed with ``yaml.safe_load``); a new dict.

    Missing intermediate keys are created; descending into a non-mapping value is an error naming the key.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"load_config: override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(p == "" for p in parts):
            raise ValueError(f"load_config: override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else None
        except yaml.YAMLError as e:
            raise ValueError(f"load_config: override {item!r}: value {raw!r} is not valid YAML: {e}") from None
        node = cfg
        for i, p in enumerate(parts[:-1]):
            if p not in node or node[p] is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ValueError(f"load_config: override {item!r}: `{'.'.join(parts[:i + 1])}` is "
                                 f"{type(node[p]).__name__}, not a mapping")
            node = node[p]
        node[parts[-1]] = value
    return cfg


def load_config(path: Union[str, Path], overrides: Iterable[str] = ()) -> dict:
    """Load a YAML config, resolve ``_base_`` (relative to the file, deep merge, child wins), apply overrides.

    Args:
        path: the YAML file.
        overrides: ``"a.b.c=value"`` strings; values parsed with ``yaml.safe_load`` (``lr=0.1`` is a float,
            ``amp=bf16`` a string, ``x=null`` None, ``l=[1,2]`` a list).

    Returns:
        The merged dict (``_base_`` keys removed).
    """
    cfg = _load(Path(path), [])
    return apply_overrides(cfg, list(overrides))
