"""Training metrics: JSON lines in ``RUN/metrics.jsonl`` (rank 0), optional TensorBoard, and
small statistics used as collapse/divergence monitors.

A resumed run first truncates ``metrics.jsonl`` to the rows with step <= the resumed step, so the
file always describes exactly one trajectory.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dinov2.utils.io import atomic_write_text


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated, else this process's max RSS (Linux reports KiB, macOS bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# The monitors return 0-d tensors on the input's device: the trainer reads them together with the
# loss terms in one transfer at its log steps.
@torch.no_grad()
def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the entropy (nats) of a probability matrix [N, K].

    Collapse monitor: ~log(K) means uniform outputs, ~0 means one-hot onto one prototype."""
    p = probs.float().clamp_min(1e-12)
    return -(p * p.log()).sum(-1).mean()


@torch.no_grad()
def prototype_usage_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-mean distribution (low when all samples use the same prototypes)."""
    m = probs.float().mean(0).clamp_min(1e-12)
    return -(m * m.log()).sum()


@torch.no_grad()
def feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over dims of the across-batch std of L2-normalised features (0 = collapsed)."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    if f.shape[0] < 2:
        return f.new_full((), float("nan"))
    return f.std(0).mean()


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._fh = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:  # optional dependency
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
            except Exception:
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop rows newer than ``step`` (left by a run killed after its last checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if int(row.get("step", -1)) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _clean(v) for k, v in row.items()}
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(clean, sort_keys=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = int(row.get("step", 0))
            for k, v in clean.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None



class StepWindow:
    """Timing of the steps since the previous log step.  Steps in between are not synchronised with
    the device, so one step's wall time means little on a GPU; the window's average does."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.data_time = 0.0

    def add_data_time(self, seconds: float) -> None:
        self.steps += 1
        self.data_time += seconds

    def take(self) -> tuple[float, float]:
        """(mean step time, mean data time) since the last call; call at a sync step."""
        now = time.perf_counter()
        n = max(self.steps, 1)
        out = ((now - self.t0) / n, self.data_time / n)
        self.t0, self.steps, self.data_time = now, 0, 0.0
        return out
