"""Per-step metrics: JSONL (one object per step, the source of truth for reports) and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional

from megatron_amir.fileio import atomic_write_text
from megatron_amir.training.checkpoint import WARMUP_KIND

log = logging.getLogger(__name__)


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf
    return v


RL_KIND = "rl"


def row_kind(row: dict[str, Any]) -> str:
    """Which run wrote a metrics row: the supervised warm-up (its rows carry ``sft/...`` keys, e.g. ``sft/loss``)
    or the RL trainer. Both write ``<logging.dir>/metrics.jsonl``, the same file when they share a logging.dir."""
    return WARMUP_KIND if any(k.startswith("sft/") for k in row) else RL_KIND


class MetricsLogger:
    """Appends ``{"step": s, ...}`` lines to ``metrics.jsonl``; on resume, drops lines past the resumed step
    so a resumed run's file equals an uninterrupted run's. TensorBoard events go to
    ``<log_dir>/tensorboard/<kind>`` (one TensorBoard run per kind: the RL trainer's ``rl``, the warm-up's
    ``sft-warmup``), and a resume purges that run's points past the resumed step the same way."""

    def __init__(self, log_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True,
                 name: str = "metrics.jsonl", kind: str = RL_KIND):
        self.enabled = enabled
        self.path = Path(log_dir) / name
        self.tb_dir = Path(log_dir) / "tensorboard" / kind
        self._jsonl = jsonl and enabled
        self._tb = None
        if enabled:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        if tensorboard and enabled:
            self._tb = self._open_tb()

    def _open_tb(self, purge_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(str(self.tb_dir), purge_step=purge_step)
        except Exception as exc:  # tensorboard is optional at run time
            log.warning("TensorBoard disabled: %s", exc)
            return None

    def truncate_after(self, step: int, kind: Optional[str] = None) -> None:
        """Drop the rows past ``step`` (of ``kind`` only, see ``row_kind``; None: of any kind): a run resumed at
        ``step`` (or restarted at 0) re-logs them. Rows of another kind (the warm-up's and the RL run's, when
        they share a logging.dir) are kept as they are. A line that is not JSON (torn by a kill mid-append) is
        dropped. The file is replaced atomically: a crash leaves the old file or the new one, never neither.
        TensorBoard: this logger's run drops its points past ``step`` too (``purge_step``), so a resumed run
        does not draw the re-done steps twice."""
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tb(purge_step=step + 1)
        if not (self._jsonl and self.path.exists()):
            return
        keep, torn = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                past = int(row["step"]) > step
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if not past or (kind is not None and row_kind(row) != kind):
                keep.append(line)
        if torn:
            log.warning("%s: dropped %d line(s) that are not metrics rows (torn by a kill mid-write?)", self.path, torn)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        if self._jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{i}: not a JSON object: {exc}") from None
    return rows


SUMMARY_KEYS = {"reward/mean": "reward", "reward/accuracy": "acc", "response/length_mean": "len",
                "amir/pair_count": "pairs", "amir/pair_accuracy": "pair_acc", "amir/lambda": "lambda", "loss": "loss",
                "grad_norm": "gnorm", "time/step_s": "s/step"}


def summary_line(step: int, total: int, m: dict[str, Any]) -> str:
    """One human line per step: the handful of numbers people watch."""
    parts = [f"step {step}/{total}"]
    for key, short in SUMMARY_KEYS.items():
        if key in m:
            v = _clean(m[key])
            parts.append(f"{short}={v:.4g}" if isinstance(v, float) else f"{short}={v}")
    return " | ".join(parts)
