"""The WKD-L class cost for training frameworks: from a file, a tensor, the teacher's classifier or CKA over data.

WKD-L needs a [C, C] cost between classes. The paper derives a class *distance* d from the teacher (1 - CKA of the
teacher's per-class features, or 1 - cosine of its classifier rows) and sharpens it, c = 1 - exp(-kappa d)
(``wkd_kernels.interrelations``). :func:`resolve_wkd_cost` accepts every source as a distance and returns the
sharpened cost; ``kappa = 0`` uses the distance as the cost unchanged.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from ..interrelations import cka_distance, classifier_cosine_distance, sharpen

__all__ = ["load_class_distance", "class_features_from_loader", "resolve_wkd_cost", "COST_SOURCES"]

COST_SOURCES = ("classifier", "cka")


def load_class_distance(path: Union[str, os.PathLike], fn: str = "load_class_distance") -> Tensor:
    """A [C, C] class distance from ``path``: a ``torch.save``d tensor, or dict with key ``"distance"`` (what
    ``examples/classification/build_cost_matrix.py`` writes), or a NumPy ``.npy`` array. Float32 on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: cost file `{path}` does not exist")
    if path.endswith(".npy"):
        import numpy as np
        value = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a file that is not a torch checkpoint: name it
            raise ValueError(f"{fn}: cost file `{path}` is not a torch.save'd tensor or .npy array ({exc})") from exc
        if isinstance(value, dict):
            if "distance" not in value:
                raise ValueError(f"{fn}: cost file `{path}` holds a dict without key 'distance' (keys: "
                                 f"{sorted(map(str, value))})")
            value = value["distance"]
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] != value.shape[1]:
        shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{fn}: cost file `{path}` must hold a square [C, C] distance, got {shape}")
    if not value.is_floating_point():
        raise TypeError(f"{fn}: cost file `{path}` holds {value.dtype} values, expected floating point")
    return value.float()


@torch.no_grad()
def class_features_from_loader(features_fn: Callable[[Tensor], Tensor], loader: Iterable, num_classes: int,
                               samples_per_class: int, device=None, fn: str = "class_features_from_loader") -> Tensor:
    """[C, n, D] features of the first ``samples_per_class`` = n samples of every class in ``loader``.

    ``loader`` yields ``(images, targets)`` with integer class targets [B] (or one-hot / soft rows [B, C]: their
    argmax); ``features_fn(images)`` returns [B, D] (e.g. the teacher's pooled pre-logits). Stops as soon as every
    class has n samples; a class with fewer in the whole loader is an error naming it.
    """
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 2:
        raise ValueError(f"{fn}: `samples_per_class` must be an integer >= 2, got {samples_per_class!r}")
    store: Optional[Tensor] = None
    count = torch.zeros(num_classes, dtype=torch.long)
    for batch in loader:
        images, targets = batch[0], batch[1]
        if device is not None:
            images = images.to(device)
        y = targets.argmax(1) if targets.dim() == 2 else targets
        y = y.to("cpu", torch.long)
        if bool(((y < 0) | (y >= num_classes)).any()):
            raise ValueError(f"{fn}: the loader yields targets outside [0, {num_classes})")
        feats = features_fn(images).float().cpu()
        if feats.dim() != 2:
            raise ValueError(f"{fn}: the features must be [B, D], got shape {list(feats.shape)}")
        if store is None:
            store = feats.new_zeros(num_classes, samples_per_class, feats.shape[1])
        for i in range(y.shape[0]):
            c = int(y[i])
            if count[c] < samples_per_class:
                store[c, count[c]] = feats[i]
                count[c] += 1
        if bool((count >= samples_per_class).all()):
            return store
    short = torch.nonzero(count < samples_per_class).flatten()[:5].tolist()
    raise ValueError(f"{fn}: the loader has fewer than {samples_per_class} samples of classes {short} (of "
                     f"{num_classes}); lower `samples_per_class` or give a loader that covers every class")


def resolve_wkd_cost(cost, kappa: float, num_classes: int, *, classifier_weight: Optional[Tensor] = None,
                     features_fn: Optional[Callable[[Tensor], Tensor]] = None, loader: Optional[Iterable] = None,
                     samples_per_class: int = 50, device=None, fn: str = "resolve_wkd_cost") -> Tensor:
    """The sharpened [C, C] WKD-L cost ``sharpen(d, kappa)`` (float32, on the CPU) from a class distance d given as

        a [C, C] tensor; a file path (:func:`load_class_distance`);
        ``"classifier"``: ``classifier_cosine_distance(classifier_weight)`` (the teacher's last linear layer);
        ``"cka"``: ``cka_distance`` (linear CKA, the paper's choice) of ``features_fn`` features of
        ``samples_per_class`` samples per class from ``loader``.

    ``num_classes`` is checked against the distance (a mismatch names both sizes).
    """
    if isinstance(cost, Tensor):
        d = cost.detach().float().cpu()
    elif cost == "classifier":
        if classifier_weight is None:
            raise ValueError(f"{fn}: `cost='classifier'` needs the teacher's classifier weight")
        d = classifier_cosine_distance(classifier_weight.detach().float().cpu())
    elif cost == "cka":
        if loader is None or features_fn is None:
            raise ValueError(f"{fn}: `cost='cka'` needs `cost_loader` (a loader of (images, targets)) to compute the "
                             "teacher's per-class features")
        feats = class_features_from_loader(features_fn, loader, num_classes, samples_per_class, device, fn)
        d = cka_distance(feats).float()
    elif isinstance(cost, (str, os.PathLike)):
        d = load_class_distance(cost, fn)
    else:
        raise TypeError(f"{fn}: `cost` must be a [C, C] tensor, a file path, or one of {COST_SOURCES}, got "
                        f"{type(cost).__name__}")
    if d.dim() != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"{fn}: the class distance must be square [C, C], got shape {list(d.shape)}")
    if d.shape[0] != num_classes:
        raise ValueError(f"{fn}: the class distance is [{d.shape[0]}, {d.shape[1]}] but the models have "
                         f"C = {num_classes} classes; it must be [{num_classes}, {num_classes}]")
    return sharpen(d, kappa)
