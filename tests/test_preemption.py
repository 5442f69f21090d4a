"""megatron_amir/training/preemption.py: signals set a flag, all ranks agree to stop after the same step, exit code 75."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from megatron_amir.training import preemption
from megatron_amir.training.preemption import REQUEUE_EXIT_CODE, PreemptionHandler

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_and_uninstall_restores(sig):
    before = signal.getsignal(sig)
    h = PreemptionHandler().install()
    try:
        assert not h.requested and not h.should_stop()
        os.kill(os.getpid(), sig)
        assert h.requested and h.received == sig
        assert h.should_stop()  # no process group: just the local flag
        h.reset()
        assert not h.requested
    finally:
        h.uninstall()
    assert signal.getsignal(sig) == before


def test_second_ctrl_c_stops_at_once():
    """First SIGINT: flag only (checkpoint after the step); a second one raises KeyboardInterrupt right away.
    Repeated SIGTERM / SIGUSR1 never force (Slurm may send them twice)."""
    h = PreemptionHandler((signal.SIGINT, signal.SIGTERM)).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert h.requested and h.received == signal.SIGTERM
        h.reset()
        os.kill(os.getpid(), signal.SIGINT)
        assert h.requested and h.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes of the main thread
                pass
    finally:
        h.uninstall()


def test_module_level_helpers():
    preemption.uninstall_handlers()
    assert not preemption.preemption_requested()
    with pytest.raises(RuntimeError, match="install_handlers"):
        preemption.should_stop()
    h = preemption.install_handlers()
    try:
        assert preemption.install_handlers() is h  # once per process
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.preemption_requested() and preemption.should_stop()
    finally:
        preemption.uninstall_handlers()


def test_install_outside_main_thread_is_an_error():
    errors = []

    def body():
        try:
            PreemptionHandler().install()
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


def test_requeue_exit_code_matches_scripts():
    assert REQUEUE_EXIT_CODE == 75
    common = (ROOT / "slurm" / "common.sh").read_text()
    assert re.search(r"^REQUEUE_EXIT_CODE=(\d+)$", common, re.M).group(1) == str(REQUEUE_EXIT_CODE)


class _LoopOnly:
    """What ``Trainer.train`` touches besides its own preemption code: steps, metrics, checkpoints, a barrier."""

    def __init__(self, signal_at: int, sig: int):
        self.signal_at, self.sig, self.saved = signal_at, sig, []

    def train_step(self) -> dict:
        if self.trainer.step + 1 == self.signal_at:
            os.kill(os.getpid(), self.sig)  # arrives during the step, as Slurm's warning does
        return {}

    def save(self) -> None:
        self.saved.append(self.trainer.step)


@pytest.mark.parametrize("sig,code", [(signal.SIGUSR1, REQUEUE_EXIT_CODE), (signal.SIGTERM, REQUEUE_EXIT_CODE),
                                      (signal.SIGINT, 130)], ids=["SIGUSR1", "SIGTERM", "SIGINT"])
def test_trainer_checkpoints_and_returns_the_scripts_exit_code(sig, code):
    """The trainer's own loop (Trainer.train, its handlers and _should_stop) on a signal: it finishes the step,
    checkpoints it and returns the code slurm/common.sh requeues on (75), or 130 for Ctrl-C."""
    from types import SimpleNamespace

    from megatron_amir.training.trainer import Trainer

    parts = _LoopOnly(signal_at=3, sig=sig)
    t = Trainer.__new__(Trainer)  # the loop alone: no model, data or process group
    parts.trainer = t
    t.cfg = SimpleNamespace(train=SimpleNamespace(steps=10), eval=SimpleNamespace(interval=0),
                            checkpoint=SimpleNamespace(save_interval=1000), logging=SimpleNamespace(progress=False))
    t.step, t.rank = 0, 1
    t.train_step, t.save = parts.train_step, parts.save
    t.metrics = SimpleNamespace(log=lambda step, metrics: None, close=lambda: None)
    t.policy = SimpleNamespace(barrier=lambda: None)
    before = signal.getsignal(signal.SIGINT)
    try:
        assert t.train() == code
    finally:
        preemption.uninstall_handlers()
    assert signal.getsignal(signal.SIGINT) == before
    assert t.step == 3 and parts.saved == [3]


def test_exit_for_requeue_exits_75():
    code = "from megatron_amir.training.preemption import exit_for_requeue; exit_for_requeue()"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=60)
    assert res.returncode == 75


_AGREE = r"""
import os, signal, sys, torch, torch.distributed as dist
torch.set_num_threads(1)
from megatron_amir.training import preemption
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=int(sys.argv[1]), world_size=2)
h = preemption.install_handlers()
rank = dist.get_rank()
for step in range(1, 6):
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)   # only rank 1 is signalled, in the middle of step 3
    dist.barrier()
    if h.should_stop():
        print(f"rank {rank} local_flag={int(h.requested)} stop_after={step}", flush=True)
        preemption.exit_for_requeue()
print(f"rank {rank} never stopped", flush=True)
"""


@pytest.mark.dist
def test_all_ranks_stop_after_the_same_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE, str(r), str(port)], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [75, 75], [e for _, e in outs]
    lines = sorted(o.strip() for o, _ in outs)
    assert lines == ["rank 0 local_flag=0 stop_after=3", "rank 1 local_flag=1 stop_after=3"]
