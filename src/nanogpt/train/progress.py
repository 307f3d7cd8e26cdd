"""What a training run shows while it works, in both backends: the steps bar, the val lines, evaluations.

The bar goes to stderr and `progress=False` hides it; the `step N: val loss` lines go to stdout either way
(through the bar's writer while a bar is drawn, so that they never land inside it), because a run without a
bar must still say how it is doing. An evaluation (minutes at step 0 on the card's presets) shows its
batches in the bar's description, so the bar never sits still without saying why.

    bar = StepBar(total=1000, initial=0, desc="train", enabled=True)
    val = estimate_loss(..., on_batch=bar.evaluating); bar.evaluated(); bar.say(f"step 0: val loss {val}")
"""

from __future__ import annotations

import sys
import time

REFRESH_S = 0.5  # at most two redraws a second for an evaluation's count: its batches can take milliseconds


class StepBar:
    """The optimizer steps as a tqdm bar on stderr (a no-op bar when not `enabled`)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool) -> None:
        from tqdm import tqdm

        self.desc, self.enabled, self._drawn = desc, enabled, 0.0
        self.bar = tqdm(
            total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, disable=not enabled
        )

    def step(self, loss: float, lr: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def say(self, line: str) -> None:
        """One line on stdout, bar or not; flushed, so a piped run's log shows it when it happens."""
        if self.enabled:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line)
        sys.stdout.flush()

    def evaluating(self, done: int, total: int) -> None:
        """An evaluation has scored `done` of its `total` batches (the `on_batch` of `estimate_loss`)."""
        now = time.monotonic()
        if not self.enabled or (done and now - self._drawn < REFRESH_S):
            return
        self._drawn = now
        self.bar.set_description_str(f"{self.desc} (evaluating {done}/{total} batches)")

    def evaluated(self) -> None:
        if self.enabled:
            self.bar.set_description_str(self.desc)

    def close(self) -> None:
        self.bar.close()
