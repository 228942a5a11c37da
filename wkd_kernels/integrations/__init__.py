"""WKD losses inside training frameworks that vision practitioners already use.

    wkd_kernels.integrations.timm         WKDLogitDistillationTask, WKDFeatureDistillationTask (timm >= 1.0.20's
                                          ``timm.task`` API; timm is an optional dependency)
    wkd_kernels.integrations.torchdistill WKD-L / WKD-F registered as torchdistill mid-level losses
                                          (keys ``WKDLogitLoss``, ``WKDFeatureLoss``)
    wkd_kernels.integrations.cost         the WKD-L class cost from a file, a tensor, a classifier or CKA

The framework modules are imported explicitly (nothing here imports timm or torchdistill).
"""
