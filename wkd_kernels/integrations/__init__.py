"""WKD losses inside training frameworks that vision practitioners already use.

    wkd_kernels.integrations.timm         WKDLogitDistillationTask, WKDFeatureDistillationTask (the
                                          ``timm.task`` API of timm 1.0.x, checked with 1.0.31; optional)
    wkd_kernels.integrations.torchdistill WKD-L / WKD-F registered as torchdistill mid-level losses
                                          (keys ``WKDLogitLoss``, ``WKDFeatureLoss``)
    wkd_kernels.integrations.cost         the WKD-L class cost from a file, a tensor, a classifier or CKA

The framework modules are imported explicitly (nothing here imports timm or torchdistill).
"""
