"""``build_model(name, num_classes, checkpoint=...)``: every model of the classification examples by name.

No network access anywhere: torchvision models are built with ``weights=None`` and timm models with
``pretrained=False``; pretrained weights come only from a local ``checkpoint`` file. timm is imported only when a
timm model is built.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Union

from torch import Tensor, nn

from examples.common.checkpoint import read_torch_file

from .cifar_resnet import CIFAR_RESNET_CONFIGS, cifar_resnet
from .mobilenet_v1 import mobilenet_v1
from .shufflenet_v1 import shufflenet_v1
from .wrapper import (DistillModel, StagedDistillModel, TimmDistillModel, TorchvisionMobileNetV2DistillModel,
                      TorchvisionResNetDistillModel)
from .wrn import WRN_CONFIGS, wrn

__all__ = ["build_model", "list_models", "load_checkpoint_into", "extract_state_dict", "CheckpointMismatchError"]

CIFAR_SIZE = 32
IMAGENET_SIZE = 224


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model (the message names the file and the keys)."""


def _staged(factory: Callable[[str, int], nn.Module], input_size: int) -> Callable[[str, int], DistillModel]:
    def build(name: str, num_classes: int) -> DistillModel:
        return StagedDistillModel(factory(name, num_classes), name=name, num_classes=num_classes,
                                  input_size=input_size)
    return build


def _torchvision(name: str, num_classes: int) -> DistillModel:
    import torchvision.models as tvm
    net = getattr(tvm, name)(weights=None, num_classes=num_classes)
    cls = TorchvisionMobileNetV2DistillModel if name == "mobilenet_v2" else TorchvisionResNetDistillModel
    return cls(net, name=name, num_classes=num_classes, input_size=IMAGENET_SIZE)


def _import_timm(name: str):
    try:
        import timm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"model {name!r} is a timm model: install timm (pip install timm) to build it") from e
    return timm


# our name -> timm model name (built with pretrained=False)
_TIMM_NAMES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "vit_small": "vit_small_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
    "convnext_tiny": "convnext_tiny",
}


def _vit_indices(depth: int) -> List[int]:
    """Block indices after depth 1/4, 1/2, 3/4 and the end (12 blocks -> [2, 5, 8, 11])."""
    return [depth * k // 4 - 1 for k in range(1, 5)]


def _timm(name: str, num_classes: int) -> DistillModel:
    timm = _import_timm(name)
    net = timm.create_model(_TIMM_NAMES[name], pretrained=False, num_classes=num_classes)
    tokens = name in ("vit_small", "deit_tiny")
    indices = _vit_indices(len(net.blocks)) if tokens else [0, 1, 2, 3]
    return TimmDistillModel(net, name=name, num_classes=num_classes, input_size=IMAGENET_SIZE, indices=indices,
                            tokens=tokens)


def _swin_pico(name: str, num_classes: int) -> DistillModel:
    """Swin-Pico of the OFA-KD code: timm's ``SwinTransformer`` class with patch 4, window 7, embed_dim 48,
    depths (2, 2, 6, 2), heads (3, 6, 12, 24) at 224 x 224 (stages [N, 48|96|192|384, 56|28|14|7, ...])."""
    _import_timm(name)
    from timm.models.swin_transformer import SwinTransformer
    net = SwinTransformer(img_size=IMAGENET_SIZE, patch_size=4, window_size=7, embed_dim=48, depths=(2, 2, 6, 2),
                          num_heads=(3, 6, 12, 24), num_classes=num_classes)
    return TimmDistillModel(net, name=name, num_classes=num_classes, input_size=IMAGENET_SIZE,
                            indices=[0, 1, 2, 3], tokens=False)


_BUILDERS: Dict[str, Callable[[str, int], DistillModel]] = {
    # ImageNet (224); resnet18 / mobilenet_v2 are also the CNN students of the OFA setting (CIFAR-100 at 224)
    **{n: _torchvision for n in ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")},
    "mobilenet_v1": _staged(lambda _, c: mobilenet_v1(c), IMAGENET_SIZE),
    # CIFAR (32)
    **{n: _staged(cifar_resnet, CIFAR_SIZE) for n in CIFAR_RESNET_CONFIGS},
    **{n: _staged(wrn, CIFAR_SIZE) for n in WRN_CONFIGS},
    "shufflenet_v1": _staged(lambda _, c: shufflenet_v1(c), CIFAR_SIZE),
    # OFA cross-architecture setting (timm, 224)
    **{n: _timm for n in _TIMM_NAMES},
    "swin_pico": _swin_pico,
}


def list_models() -> List[str]:
    """All names :func:`build_model` accepts, sorted."""
    return sorted(_BUILDERS)


def build_model(name: str, num_classes: int, *, checkpoint: Optional[str] = None,
                trusted: bool = False) -> DistillModel:
    """Build ``name`` (see :func:`list_models`) with a ``num_classes``-way classifier, wrapped in a DistillModel.

    ``checkpoint``: optional path of a state dict to load (see :func:`load_checkpoint_into`; ``trusted``: the user's
    opt-in to full unpickling of that file). Raises ValueError for an unknown name (listing the available ones),
    CheckpointMismatchError when the checkpoint does not fit.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"build_model({name!r}): num_classes must be a positive int, got {num_classes!r}")
    model = _BUILDERS[name](name, num_classes)
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint, trusted=trusted)
    return model


# ----------------------------------------------------------------------------------------------------- checkpoints
_CONTAINER_KEYS = ("model", "state_dict", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "net.")  # DDP, torch.compile, DistillModel.state_dict()
_MAX_LISTED = 20


def _read_file(path: str, trusted: bool = False) -> object:
    if path.endswith(".safetensors"):  # e.g. timm / Hugging Face exports
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"checkpoint {path}: reading .safetensors files needs the safetensors package") from e
        return load_file(path, device="cpu")
    # weights_only=True with the NumPy types of the trainer's and CRD's files allowed; anything else is refused
    # (naming the file and the opt-in) unless the user trusts this file
    return read_torch_file(path, trusted=trusted)


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def extract_state_dict(obj: object, path: str = "<checkpoint>") -> Dict[str, Tensor]:
    """A raw state dict, or the one under "model" / "state_dict" / "net", with "module." (DDP), "_orig_mod."
    (torch.compile) and "net." (a DistillModel's own state dict) prefixes stripped."""
    if not _is_state_dict(obj):
        found = None
        if isinstance(obj, Mapping):
            found = next((obj[k] for k in _CONTAINER_KEYS if k in obj and _is_state_dict(obj[k])), None)
        if found is None:
            what = f"keys {sorted(map(str, obj))[:_MAX_LISTED]}" if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointMismatchError(
                f"checkpoint {path}: neither a state dict nor a dict with a state dict under one of "
                f"{list(_CONTAINER_KEYS)} (found {what})")
        obj = found
    sd = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                stripped = True
    return sd


def _listed(keys: List[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def load_checkpoint_into(model: DistillModel, path: Union[str, os.PathLike], *, trusted: bool = False) -> None:
    """Load the weights stored at ``path`` into ``model.net`` (strict), on CPU tensors copied in place.

    Accepts a raw state dict (``torch.save`` file or ``.safetensors``), or a dict holding it under "model" /
    "state_dict" / "net" (CRD, mdistiller and the trainer's checkpoints), with or without "module." / "_orig_mod." /
    "net." prefixes. The file is read with ``weights_only=True`` (``examples.common.checkpoint.read_torch_file``)
    unless ``trusted``. Raises
    FileNotFoundError for a missing file, ``checkpoint.CheckpointError`` for a corrupted or untrusted one
    (``UntrustedCheckpointError``: it holds objects that could run code), and CheckpointMismatchError naming the
    path and the missing, unexpected and wrongly shaped keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist (model {model.name})")
    sd = extract_state_dict(_read_file(path, trusted), path)
    own = model.net.state_dict()
    bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad_shapes:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit model {model.name!r} (num_classes={model.num_classes}): "
            f"shape mismatch for {_listed(bad_shapes)}")
    result = model.net.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match model {model.name!r}: "
            f"missing keys [{_listed(list(result.missing_keys))}]; "
            f"unexpected keys [{_listed(list(result.unexpected_keys))}]")
