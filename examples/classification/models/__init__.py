"""Model zoo of the classification examples: ``build_model(name, num_classes, checkpoint=None)``.

Every model is a :class:`DistillModel` returning ``DistillModelOutput(logits, features)`` with features
"stage1".."stageK", "last" (= deepest stage) and "pooled" (the classifier's input); see ``wrapper.py``.

    ImageNet (224):  resnet18, resnet34, resnet50, resnet101, mobilenet_v2 (torchvision), mobilenet_v1 (KD literature)
    CIFAR (32):      resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2,
                     shufflenet_v1 (the CRD "RepDistiller" definitions)
    OFA (224, timm): swin_tiny, swin_pico, vit_small, deit_tiny, convnext_tiny (+ resnet18 / mobilenet_v2)
"""
from .registry import CheckpointMismatchError, build_model, list_models, load_checkpoint_into
from .wrapper import DistillModel, DistillModelOutput

__all__ = ["build_model", "list_models", "load_checkpoint_into", "CheckpointMismatchError", "DistillModel",
           "DistillModelOutput"]
