"""Loss-weight schedule of the published WKD training recipe."""
from __future__ import annotations

import math

__all__ = ["cosine_weight"]


def cosine_weight(epoch: float, base_weight: float, decay_start_epoch: float, total_epochs: float) -> float:
    """Cosine decay of a loss weight after a constant phase, as in the published WKD distiller.

        w(e) = w0                                               for e <= E0
        w(e) = 0.5 * w0 * (1 + cos(pi * (e - E0) / (E - E0)))   for E0 < e <= E

    Args:
        epoch: current epoch e (int or fractional), 0 <= e <= total_epochs.
        base_weight: w0.
        decay_start_epoch: E0 >= 0, last epoch at full weight.
        total_epochs: E > E0; the weight reaches 0 at e = E.

    Returns:
        The weight w(e) as a Python float (pass it to ``WKDLogitLoss.weight``).
    """
    fn = "cosine_weight"
    for name, v in (("epoch", epoch), ("base_weight", base_weight), ("decay_start_epoch", decay_start_epoch),
                    ("total_epochs", total_epochs)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{fn}: `{name}` must be a finite number, got {v!r}")
    if decay_start_epoch < 0:
        raise ValueError(f"{fn}: `decay_start_epoch` must be >= 0, got {decay_start_epoch!r}")
    if not total_epochs > decay_start_epoch:
        raise ValueError(f"{fn}: `total_epochs` ({total_epochs!r}) must be greater than `decay_start_epoch` "
                         f"({decay_start_epoch!r})")
    if epoch < 0 or epoch > total_epochs:
        raise ValueError(f"{fn}: `epoch` must be in [0, total_epochs={total_epochs!r}], got {epoch!r}")
    if epoch <= decay_start_epoch:
        return float(base_weight)
    frac = (epoch - decay_start_epoch) / (total_epochs - decay_start_epoch)
    return 0.5 * float(base_weight) * (1.0 + math.cos(math.pi * frac))
