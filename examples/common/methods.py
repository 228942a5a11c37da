"""The name -> distillation method registry shared by the classification and detection examples.

``distill.method`` in a config names one entry; the entry says which loss terms (``distill.<term>`` sections of
``schema.DistillConfig``) the method trains with and whether it needs a teacher. Each task builds the terms it
supports (``Method.terms``) and rejects the others with :func:`get_method`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Collection, Dict, Tuple

__all__ = ["Method", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    name: str
    terms: Tuple[str, ...]   # distillation terms added to the student's own loss, in this order
    doc: str

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("ce", (), "the student alone (classification: cross-entropy; detection: the Faster R-CNN losses)"),
    Method("kd", ("kd",), "Hinton KD"),
    Method("dkd", ("dkd",), "decoupled KD"),
    Method("nkd", ("nkd",), "normalized KD"),
    Method("fitnet", ("fitnet",), "FitNet hint (MSE on projected features)"),
    Method("wkd_l", ("wkd_l",), "WKD-L: discrete Wasserstein distance between the predictions"),
    Method("wkd_f", ("wkd_f",), "WKD-F: Wasserstein distance between Gaussians of the features"),
    Method("wkd_lf", ("wkd_l", "wkd_f"), "WKD-L + WKD-F"),
)}


def get_method(name, supported: Collection[str], where: str = "distill.method") -> Method:
    """The registry entry ``name``; an error naming the closest supported name when unknown or unsupported."""
    if name not in METHODS or name not in supported:
        close = difflib.get_close_matches(str(name), sorted(supported), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"`{where}` must be one of {sorted(supported)}, got {name!r}{hint}")
    return METHODS[name]
