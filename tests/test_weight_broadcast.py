"""Bucketed weight broadcast into a fleet (FleetEngine transport="broadcast", what rollout.weight_sync=broadcast
builds): two embedded servers as real processes on loopback, each in its own gloo group with the trainer side.
Greedy output after an update equals the trainer-side model's; a server SIGKILLed mid-broadcast fails alone (the
other server and the caller go on, the dead one leaves the rotation); a trainer that dies mid-broadcast leaves the
servers serving the previous version (rollback; without it: serving nothing until a restarted trainer's complete
update); a member that misses an update is out of the rotation until it reports the current version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from megatron_amir.rollout.client import FleetEngine
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.weight_sync import PackedBuckets
from rollout_helpers import tiny_hf_model

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bcast-token"
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]
GREEDY = SamplingParams(temperature=0, max_new_tokens=10)
BUCKET = 24 * 1024  # several buckets for the tiny model


class Interrupted:
    """A bucketed stream that runs ``action`` once ``after`` buckets have been sent (a kill, a crash)."""

    def __init__(self, packed: PackedBuckets, after: int, action):
        self.packed, self.after, self.action = packed, after, action

    def update_info(self) -> dict:
        return self.packed.update_info()

    def __iter__(self):
        for i, bucket in enumerate(self.packed):
            if i == self.after:
                self.action()
            yield bucket

    def drain(self) -> None:
        for _ in self:
            pass


def greedy(model, prompt, n_new=10):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _start(model_dir: Path, tmp: Path, i: int) -> tuple[subprocess.Popen, str]:
    port_file = tmp / f"port{i}"
    cmd = [sys.executable, "-m", "megatron_amir.rollout.server", "--model", str(model_dir), "--port", "0",
           "--port-file", str(port_file), "--api-key", TOKEN]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=open(tmp / f"server{i}.log", "wb"), stderr=subprocess.STDOUT, env=env,
                            cwd=ROOT)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server {i} did not start:\n{(tmp / f'server{i}.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, port_file.read_text().strip()


@pytest.fixture
def servers(tmp_path):
    hf, cfg = tiny_hf_model("llama", seed=0)
    hf.save_pretrained(tmp_path / "model")
    started = []
    try:
        for i in range(2):
            started.append(_start(tmp_path / "model", tmp_path, i))
        yield cfg, started
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def _engine(urls, timeout_s=30.0) -> FleetEngine:
    return FleetEngine(urls, use_router=False, token=TOKEN, transport="broadcast", broadcast_timeout_s=timeout_s,
                       timeout_s=120)


def outputs(engine: FleetEngine, url: str, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    """Greedy completions from one server (direct mode sends round-robin over the serving list: ask it alone)."""
    keep = engine.client.servers
    engine.client.servers = [url]
    try:
        return [g.samples[0].token_ids for g in engine.generate(prompts, params)]
    finally:
        engine.client.servers = keep


def test_update_then_server_killed_mid_broadcast(servers):
    cfg, started = servers
    (proc_a, a), (proc_b, b) = started
    first, _ = tiny_hf_model("llama", seed=7)
    second, _ = tiny_hf_model("llama", seed=8)
    engine = _engine([a, b])
    try:
        report = engine.load_weight_buckets(PackedBuckets(first.state_dict(), bucket_bytes=BUCKET), 1)
        assert report == {a: "ok", b: "ok"} and engine.version == 1
        refs = [greedy(first, p) for p in PROMPTS]
        assert outputs(engine, a) == refs and outputs(engine, b) == refs

        packed = PackedBuckets(second.state_dict(), bucket_bytes=BUCKET)
        assert len(packed.sizes) >= 3
        t0 = time.monotonic()
        report = engine.load_weight_buckets(Interrupted(packed, 1, proc_b.kill), 2)
        elapsed = time.monotonic() - t0
        assert report[a] == "ok" and report[b] != "ok", report
        assert engine.version == 2 and engine.client.servers == [a] and b in engine.out_of_rotation
        assert outputs(engine, a) == [greedy(second, p) for p in PROMPTS]
        assert elapsed < 60, elapsed  # the dead member did not hold the others for the group timeout and more

        report = engine.load_weight_buckets(PackedBuckets(first.state_dict(), bucket_bytes=BUCKET), 3)
        assert report[a] == "ok" and report[b].startswith("unreachable") and engine.client.servers == [a]
    finally:
        engine.close()


def _crash():
    raise SystemExit("trainer died")


def test_trainer_dies_mid_broadcast_servers_keep_previous_version(servers):
    """With rollback (the default) each server puts the previous version's weights back and serves them; without it
    the servers hold a mix of two versions and answer 503 until a restarted trainer's complete update."""
    cfg, started = servers
    urls = [u for _, u in started]
    first, _ = tiny_hf_model("llama", seed=7)
    second, _ = tiny_hf_model("llama", seed=8)
    third, _ = tiny_hf_model("llama", seed=9)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    engine = _engine(urls, timeout_s=8.0)
    try:
        assert set(engine.load_weight_buckets(PackedBuckets(first.state_dict(), bucket_bytes=BUCKET), 1).values()) \
            == {"ok"}
        with pytest.raises(SystemExit):
            engine.load_weight_buckets(Interrupted(PackedBuckets(second.state_dict(), bucket_bytes=BUCKET), 1,
                                                   _crash), 2)
    finally:
        engine.close()
    # the servers' receive times out (8 s) and puts version 1 back; a request waits for that, then gets version 1
    want = greedy(first, PROMPTS[0], 3)
    for url in urls:
        httpx.post(f"{url}/resume", headers=auth, timeout=10)  # the dead trainer never resumed them
        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0,
                                                      "return_token_ids": True}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want, r.text
        info = httpx.get(f"{url}/weight_info", timeout=10).json()
        assert info["weight_version"] == "1" and "incomplete_update" not in info, info

    engine = _engine(urls, timeout_s=8.0)  # a restarted trainer, now without the rollback copy
    engine.broadcast_rollback = False
    try:
        with pytest.raises(SystemExit):
            engine.load_weight_buckets(Interrupted(PackedBuckets(second.state_dict(), bucket_bytes=BUCKET), 1,
                                                   _crash), 2)
    finally:
        engine.close()
    deadline = time.monotonic() + 60
    for url in urls:  # each keeps its previous version label and serves nothing
        while True:
            info = httpx.get(f"{url}/weight_info", timeout=10).json()
            if info.get("incomplete_update") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert info["weight_version"] == "1" and "stopped part-way" in info["incomplete_update"], info
        httpx.post(f"{url}/resume", headers=auth, timeout=10)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0},
                       timeout=30)
        assert r.status_code == 503, r.text
    restarted = _engine(urls)  # a restarted trainer forms new groups and sends a complete update
    try:
        assert set(restarted.load_weight_buckets(PackedBuckets(third.state_dict(), bucket_bytes=BUCKET), 3)
                   .values()) == {"ok"}
        assert all(outputs(restarted, u) == [greedy(third, p) for p in PROMPTS] for u in urls)
    finally:
        restarted.close()


def test_member_that_misses_an_update_leaves_the_rotation_until_it_reports_the_current_version(servers):
    """Server b is frozen (SIGSTOP) while an update starts: it does not answer in time, misses that update and leaves
    the rotation while a serves the new version. Woken again (SIGCONT) it still holds the old version and is not
    served until an update reaches it whole and it reports that version; a member that took an update but reports
    another version stays out too."""
    cfg, started = servers
    (proc_a, a), (proc_b, b) = started
    models = [tiny_hf_model("llama", seed=s)[0] for s in (7, 8, 9, 10)]
    refs = [[greedy(m, p) for p in PROMPTS] for m in models]
    engine = FleetEngine([a, b], use_router=False, token=TOKEN, transport="broadcast", broadcast_timeout_s=30,
                         timeout_s=5)  # b's silence becomes a timeout after 5 s
    try:
        assert engine.load_weight_buckets(PackedBuckets(models[0].state_dict(), bucket_bytes=BUCKET), 1) \
            == {a: "ok", b: "ok"}
        os.kill(proc_b.pid, signal.SIGSTOP)
        try:
            report = engine.load_weight_buckets(PackedBuckets(models[1].state_dict(), bucket_bytes=BUCKET), 2)
        finally:
            os.kill(proc_b.pid, signal.SIGCONT)
        assert report[a] == "ok" and report[b] != "ok", report
        assert engine.client.servers == [a] and b in engine.out_of_rotation
        assert [g.samples[0].token_ids for g in engine.generate(PROMPTS, GREEDY)] == refs[1]  # served by a alone
        assert httpx.get(f"{b}/weight_info", timeout=10).json()["weight_version"] == "1"

        honest = engine.client.weight_versions

        async def b_reports_old(key="weight_version", urls=None):
            return {**await honest(key, urls), b: "2"}

        engine.client.weight_versions = b_reports_old  # b takes the update but says it serves another version
        report = engine.load_weight_buckets(PackedBuckets(models[2].state_dict(), bucket_bytes=BUCKET), 3)
        assert report[a] == "ok" and "reports weight version '2'" in report[b], report
        assert engine.client.servers == [a] and b in engine.out_of_rotation

        engine.client.weight_versions = honest
        assert engine.load_weight_buckets(PackedBuckets(models[3].state_dict(), bucket_bytes=BUCKET), 4) \
            == {a: "ok", b: "ok"}
        assert engine.client.servers == [a, b] and not engine.out_of_rotation
        assert outputs(engine, a) == refs[3] and outputs(engine, b) == refs[3]
    finally:
        engine.close()
