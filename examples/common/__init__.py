"""Shared training utilities of the examples (classification and detection).

    distributed: DistInfo, init_distributed, cleanup_distributed, seed_everything, all_reduce_mean, barrier
    checkpoint:  save_checkpoint (atomic), load_checkpoint, capture_rng_state, restore_rng_state, unwrap_model
    metrics_log: MetricLogger (CSV + TensorBoard)
    progress:    Progress (tqdm bar with items/s)
    amp:         autocast, make_grad_scaler
    config:      load_config (YAML with ``_base_`` inheritance and dotted overrides)
"""
