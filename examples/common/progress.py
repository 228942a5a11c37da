"""A tqdm progress bar that shows items/s (images/s) throughput."""
from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["Progress"]


class Progress:
    """Progress over ``total`` items (e.g. images); each :meth:`update` adds the ``n_items`` it processed.

    As ``tqdm.update(n)``: the bar advances by ``n_items`` and shows the item rate (``items/s``); ``postfix``
    keyword values (e.g. ``loss=0.42``) are shown next to it. Disabled (a no-op that still measures throughput)
    when ``enabled=False`` or tqdm is missing. On a non-terminal stderr the bar refreshes at most every 30 s to
    keep logs short.

    Attributes:
        items: items seen so far; ``rate``: items/s measured from the first to the latest update (so start-up
        time before the first update does not dilute it; 0.0 before two updates).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True):
        if total is not None and int(total) < 0:
            raise ValueError(f"Progress: `total` must be >= 0, got {total}")
        self.total = int(total) if total is not None else None
        self.desc = desc
        self.items = 0
        self._t0: Optional[float] = None
        self._t_last: Optional[float] = None
        self._items_after_first = 0
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
                self._bar = tqdm(total=self.total, desc=desc, unit="items", dynamic_ncols=True,
                                 leave=True, mininterval=0.5 if tty else 30.0, file=sys.stderr)

    @property
    def rate(self) -> float:
        """Items per second between the first and the latest update."""
        if self._t0 is None or self._t_last is None or self._t_last <= self._t0:
            return 0.0
        return self._items_after_first / (self._t_last - self._t0)

    def update(self, n_items: int = 1, **postfix) -> None:
        """Advance by ``n_items`` items; ``postfix`` values are shown next to the rate."""
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
        else:
            self._items_after_first += int(n_items)
        self._t_last = now
        self.items += int(n_items)
        if self._bar is not None:
            if postfix:
                shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
                self._bar.set_postfix(shown, refresh=False)
            self._bar.update(int(n_items))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
