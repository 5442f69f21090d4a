"""Asynchronous rollouts: a producer thread on rank 0 generates later steps' batches while the trainer trains.

Schedule. With k = ``rollout.max_staleness`` the batch of step s is sampled with the weights of version

    need(s) = max(v0, s - k)        (v0: the weight version when the producer started, i.e. at the resume point)

and never with a fresher one, even when it has been published: the batch is then a pure function of (seed, s, the
weights of version need(s), the data cursor), whatever the timing, so a run is reproducible and a resumed run can
regenerate what it did not save. The trainer publishes version t + 1 after training step t, so while step t trains
the producer generates batches t + 1 .. t + k (the bounded queue is this dependency); the batch of step t is
t - need(t) <= k versions old when it is trained on. k = 0 is the synchronous loop: batch t waits for version t.

Checkpoints. After step t (0-based; the checkpoint holds version t + 1) the batches of steps s > t sampled with an
older version (need(s) < t + 1, i.e. s <= t + k) cannot be regenerated after a resume: ``in_flight`` waits for them and the trainer saves them
(``save_in_flight``); the later ones are regenerated from the checkpoint's weights. The producer keeps the weights of
every published version it may still need (at most k + 1 host copies).

Only the producer thread touches the engine, except through ``engine()``, which holds it for the caller (evaluation).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from megatron_amir.training.rollout_batch import RolloutBatch

log = logging.getLogger(__name__)

IN_FLIGHT_FILE = "rollouts_in_flight.pt"


@dataclass
class ProducedBatch:
    """One step's rollout batch, its rollout metrics and the data cursor right after it drew its prompts."""

    step: int
    batch: RolloutBatch
    metrics: dict[str, float]
    sampler_state: dict[str, Any]


def staleness_metrics(versions: torch.Tensor, current: int, max_staleness: int) -> dict[str, float]:
    """Staleness d = current - version of every sample: mean, max and the histogram ``staleness/frac_<j>`` (fraction
    of samples with d = j, j = 0..max_staleness). Raises if any sample is older than ``max_staleness`` versions."""
    d = current - versions.long()
    if bool((d > max_staleness).any()):
        old = int(versions.min())
        raise RuntimeError(
            f"{int((d > max_staleness).sum())} of {d.numel()} samples come from weight version {old} while the trainer "
            f"is at {current} (rollout.max_staleness={max_staleness}): a rollout server serves old weights (check "
            "the fleet's weight-update log)")
    out = {"staleness/mean": float(d.double().mean()), "staleness/max": float(d.max())}
    for j in range(max_staleness + 1):
        out[f"staleness/frac_{j}"] = float((d == j).double().mean())
    return out


def off_policy_metrics(proximal_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                       cap: Optional[float]) -> dict[str, float]:
    """Statistics of the per-token behaviour importance ratio r_t = exp(log π_prox − log π_behav) over response
    tokens (π_prox: the trainer's recomputed log-probs; π_behav: the engine's): mean, min, max and, with a TIS cap C,
    the fraction of tokens truncated (r_t > C)."""
    m = mask > 0
    if not bool(m.any()):
        return {}
    r = torch.exp((proximal_logp.double() - behaviour_logp.double())[m])
    out = {"offpolicy/ratio_mean": float(r.mean()), "offpolicy/ratio_min": float(r.min()),
           "offpolicy/ratio_max": float(r.max())}
    if cap is not None:
        out["offpolicy/truncated_frac"] = float((r > cap).double().mean())
    return out


class RolloutProducer:
    """Generates the batches of steps ``first_step .. last_step - 1`` on a background thread (see module doc).

    generate(step) -> (RolloutBatch, metrics) samples and scores one step's batch with whatever weights the engine
    holds; sampler_state() -> the data cursor after it. ``restored`` batches (from a checkpoint) are served first.
    """

    def __init__(self, engine: Any, generate: Callable[[int], tuple[RolloutBatch, dict[str, float]]],
                 sampler_state: Callable[[], dict[str, Any]], *, max_staleness: int, first_step: int, last_step: int,
                 version: int, weights: Any, restored: Sequence[ProducedBatch] = ()):
        self._engine, self._generate, self._sampler_state = engine, generate, sampler_state
        self.k, self._v0, self._last = max_staleness, version, last_step
        self._cv = threading.Condition()
        self._engine_lock = threading.Lock()
        self._weights: dict[int, Any] = {version: _own(weights)}
        self._latest = version
        self._ready: dict[int, ProducedBatch] = {b.step: b for b in restored}
        self._next = max([first_step - 1, *self._ready]) + 1
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def version_for(self, step: int) -> int:
        """need(step): the weight version the batch of ``step`` is sampled with."""
        return max(self._v0, step - self.k)

    # ------------------------------------------------------------------------------------------ trainer side
    def get(self, step: int) -> tuple[ProducedBatch, float]:
        """The batch of ``step`` and the seconds the trainer waited for it (its idle time)."""
        if step >= self._last:
            raise ValueError(f"no rollout batch is produced for step {step} (train.steps={self._last})")
        t0 = time.perf_counter()
        with self._cv:
            if step not in self._ready and step < self._next:
                raise RuntimeError(f"the rollout batch of step {step} was neither restored from the checkpoint nor "
                                   f"generated (the producer is at step {self._next})")
            while step not in self._ready and self._error is None:
                self._cv.wait()
            if step not in self._ready:
                raise RuntimeError(f"the rollout producer failed: {self._error!r}") from self._error
            return self._ready.pop(step), time.perf_counter() - t0

    def publish(self, version: int, weights: Any) -> None:
        """The trainer's new weights (HF-named tensors, copied here: the optimizer updates the originals in place)."""
        weights = _own(weights)
        with self._cv:
            self._weights[version] = weights
            self._latest = version
            self._prune()
            self._cv.notify_all()

    def in_flight(self, next_step: int) -> list[ProducedBatch]:
        """The batches of steps >= ``next_step`` (not trained on yet) that a resume from the current weights could not
        regenerate (sampled with an older version), waiting for those still being generated; the trainer saves them
        with its checkpoint."""
        with self._cv:
            steps = [s for s in range(next_step, self._last) if self.version_for(s) < self._latest]
            while not all(s in self._ready for s in steps) and self._error is None:
                self._cv.wait()
            if self._error is not None:
                raise RuntimeError(f"the rollout producer failed: {self._error!r}") from self._error
            return [self._ready[s] for s in steps]

    @contextmanager
    def engine(self) -> Iterator[Any]:
        """The engine with the latest published weights, held while the caller uses it (evaluation)."""
        with self._engine_lock:
            with self._cv:
                version, weights = self._latest, self._weights[self._latest]
            if self._engine.version != version:
                self._engine.load_weights(weights, version)
            yield self._engine

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the batch being generated (if any); waits up to ``timeout`` seconds for it."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the rollout producer is still generating after %.0f s; leaving it behind", timeout)

    # ------------------------------------------------------------------------------------------ producer side
    def _prune(self) -> None:
        keep = min(self.version_for(self._next), self._latest)
        for v in [v for v in self._weights if v < keep]:
            del self._weights[v]

    def _run(self) -> None:
        try:
            while True:
                t_wait = time.perf_counter()
                with self._cv:
                    step = self._next
                    need = self.version_for(step)
                    while not self._stop and step < self._last and self._latest < need:
                        self._cv.wait()
                    if self._stop or step >= self._last:
                        return
                    weights = self._weights[need]
                idle = time.perf_counter() - t_wait
                with self._engine_lock:
                    if self._engine.version != need:
                        self._engine.load_weights(weights, need)
                    t0 = time.perf_counter()
                    batch, metrics = self._generate(step)
                    state = self._sampler_state()
                metrics = {**metrics, "time/generate_s": time.perf_counter() - t0, "time/fleet_idle_s": idle}
                with self._cv:
                    self._ready[step] = ProducedBatch(step, batch, metrics, state)
                    self._next = step + 1
                    self._prune()
                    self._cv.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer, which raises it at its next get()
            log.exception("the rollout producer failed")
            with self._cv:
                self._error = exc
                self._cv.notify_all()


def _own(weights: Any) -> Any:
    if weights is None:
        return None
    return {k: v.detach().clone() for k, v in dict(weights).items()}


# ---------------------------------------------------------------------------------------------- checkpoint
def save_in_flight(path: Path, batches: Sequence[ProducedBatch], max_staleness: int) -> None:
    """Write the in-flight batches (tensors, metrics, data cursors) to ``path`` (inside a checkpoint's temporary
    directory: the checkpoint's rename makes it atomic)."""
    torch.save({"max_staleness": max_staleness,
                "batches": [{"step": b.step, "metrics": b.metrics, "sampler_state": b.sampler_state,
                             "tensors": {f.name: getattr(b.batch, f.name) for f in fields(RolloutBatch)}}
                            for b in batches]}, path)


def load_in_flight(path: Path, max_staleness: int) -> list[ProducedBatch]:
    """The batches ``save_in_flight`` wrote; [] when ``path`` does not exist (a synchronous checkpoint)."""
    if not path.is_file():
        return []
    data = torch.load(path, weights_only=True)
    if data["batches"] and int(data["max_staleness"]) != max_staleness:
        raise ValueError(f"{path}: saved with rollout.max_staleness={data['max_staleness']}, this run has "
                         f"{max_staleness}; resume with the same value (its in-flight batches follow that schedule)")
    return [ProducedBatch(int(b["step"]), RolloutBatch(**b["tensors"]), dict(b["metrics"]), dict(b["sampler_state"]))
            for b in data["batches"]]
