"""Distillation losses: WKD-L, WKD-F and the baselines KD, DKD, NKD and FitNet, plus the cosine weight schedule.

    WKDLogitLoss(cost, temperature, weight, reg=0.05, num_iters=10)(student_logits, teacher_logits, target)
    wkd_logit_loss(student_logits, teacher_logits, target, cost, temperature, weight, reg=0.05, num_iters=10)
    WKDFeatureLoss(student_channels, teacher_channels, covariance="diag", grid=1, mean_cov_ratio=2.0, eps=1e-5,
                   projector="bottleneck")(student_features, teacher_features) -> (loss, mean_loss, cov_loss)
    wkd_feature_loss(student_features, teacher_features, covariance="diag", grid=1, mean_cov_ratio=2.0, eps=1e-5)
    KDLoss / kd_loss, DKDLoss / dkd_loss, NKDLoss / nkd_loss, FitNetLoss / fitnet_loss
    VocabOTLoss(cost, reg=1e-3, num_iters=10, temperature=1.0, weight=1.0)(student_logits, teacher_logits, labels)
    cosine_weight(epoch, base_weight, decay_start_epoch, total_epochs)
    make_projector("conv1x1" | "conv1x1_linear" | "bottleneck" | "convreg" | None | module, student_channels,
                   teacher_channels, student_size=..., teacher_size=...)
"""
from .baselines import DKDLoss, FitNetLoss, KDLoss, NKDLoss, dkd_loss, fitnet_loss, kd_loss, nkd_loss
from .feature import WKDFeatureLoss, WKDFeatureLossOutput, wkd_feature_loss
from .logit import WKDLogitLoss, prepare_wkd_cost, wkd_logit_loss
from .projectors import make_projector
from .schedule import cosine_weight
from .vocab import VocabOTLoss

__all__ = [
    "WKDLogitLoss", "wkd_logit_loss", "prepare_wkd_cost",
    "WKDFeatureLoss", "wkd_feature_loss", "WKDFeatureLossOutput",
    "KDLoss", "kd_loss", "DKDLoss", "dkd_loss", "NKDLoss", "nkd_loss", "FitNetLoss", "fitnet_loss",
    "cosine_weight", "make_projector", "VocabOTLoss",
]
