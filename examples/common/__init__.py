"""Shared training code of the examples (classification and detection).

    trainer:     Trainer + Task hooks: the one loop (DDP, AMP, lr schedules, resume, atomic checkpoints, logging)
    schema:      the config dataclasses (every key, type and default) and ``resolve``
    methods:     the name -> distillation method registry
    losses:      build_distillation_losses: a method's loss modules and their weights (each applied once)
    config:      load_config (YAML with ``_base_`` inheritance and dotted overrides)
    distributed: DistInfo, init_distributed, cleanup_distributed, seed_everything, all_reduce_mean, barrier
    checkpoint:  save_checkpoint (atomic), load_checkpoint, capture_rng_state, restore_rng_state, unwrap_model
    metrics_log: MetricLogger (JSON lines + TensorBoard)
    amp:         autocast, make_grad_scaler
"""
