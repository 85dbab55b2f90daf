"""What a training run prints: timestamped lines on stderr, and stage 2's running figures (loss,
answer accuracy, the read-outs' errors) averaged over the last 25 optimizer steps."""

from __future__ import annotations

import math
import sys
import time

import numpy as np


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rms_m(mse: float) -> float:
    """Metres from a mean squared error in the read-outs' room frame (metres, halved)."""
    return 2 * math.sqrt(mse)


# read-out name -> (log label, figure from the window's mean); in the order the log prints them
READ_OUT_FIGURES = {
    "locate": ("locate rms {:.2f} m", _rms_m),
    "instance": ("marker bal. acc {:.3f}", float),
    "position": ("position rms {:.2f} m", lambda mse: _rms_m(mse * 3)),  # Euclidean over x, y, z
    "distance": ("distance rms {:.2f} m", _rms_m),
    "candidate_distance": ("cand. distance rms {:.2f} m", _rms_m),
    "compare": ("compare acc {:.3f}", float),
}


class Metrics:
    """Per-scene figures of stage 2, appended as each scene is trained on."""

    def __init__(self):
        self.losses: list[float] = []
        self.hits: list[int] = []  # first answer tokens right
        self.questions: list[int] = []
        self.dense_hits: list[int] = []  # dense answer targets right
        self.dense_targets: list[int] = []
        self.read_outs: dict[str, list[float]] = {k: [] for k in READ_OUT_FIGURES}  # MSE, or share right

    def line(self, step: int, total_steps: int, window: int, dense: bool, lr: float, elapsed: float) -> str:
        """The log line after optimizer step ``step`` over the last ``window`` scenes."""
        w = window
        out = (f"step {step}/{total_steps} loss {np.mean(self.losses[-w:]):.4f} "
               f"answer acc {sum(self.hits[-w:]) / max(1, sum(self.questions[-w:])):.3f} ")
        if dense:
            out += f"(at question words {sum(self.dense_hits[-w:]) / max(1, sum(self.dense_targets[-w:])):.3f}) "
        for name, (label, figure) in READ_OUT_FIGURES.items():
            if self.read_outs[name]:
                out += label.format(figure(np.mean(self.read_outs[name][-w:]))) + " "
        return out + f"lr {lr:.2e} {elapsed / step:.2f}s/step eta {elapsed / step * (total_steps - step) / 60:.1f} min"
