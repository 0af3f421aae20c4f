"""Progress reporting without printing: library code calls a callback; front ends render it.

Long-running functions take ``progress: ProgressCallback | None``. The CLI passes a
``TqdmProgress``; a notebook or a compression pipeline can pass its own callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProgressEvent:
    """``step`` of ``total`` done in ``task``, with the latest metrics (loss, accuracy...)."""

    task: str
    step: int
    total: int | None
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


def report(progress: ProgressCallback | None, task: str, step: int, total: int | None, **metrics: float) -> None:
    """Send one event to ``progress`` if there is a callback."""
    if progress is not None:
        progress(ProgressEvent(task, step, total, {k: float(v) for k, v in metrics.items()}))


class TqdmProgress:
    """Renders events as one tqdm bar per task (used by the CLI)."""

    def __init__(self, leave: bool = True) -> None:
        self.leave = leave
        self._bars: dict[str, object] = {}

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(event.task)
        if bar is None:
            bar = tqdm(total=event.total, desc=event.task, leave=self.leave, dynamic_ncols=True)
            self._bars[event.task] = bar
        bar.n = event.step
        if event.metrics:
            bar.set_postfix({k: f"{v:.4g}" for k, v in event.metrics.items()}, refresh=False)
        bar.refresh()
        if event.total is not None and event.step >= event.total:
            bar.close()
            del self._bars[event.task]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
