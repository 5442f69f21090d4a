"""Acceptance of the rollout fleet with real processes on loopback: 3 embedded servers behind
vllm-router, one SIGKILLed mid-batch; weight update then greedy outputs equal the trainer-side
transformers model; auth; malformed requests; discovery file; direct mode."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from megatron_amir.rollout.client import FleetClient, FleetEngine
from megatron_amir.rollout.embedded import EmbeddedEngine
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.router import DiscoveryWatcher, VllmRouter, read_discovery_file
from megatron_amir.rollout.weight_sync import write_snapshot
from rollout_helpers import tiny_hf_model  # pytest puts tests/ on sys.path (no __init__.py)

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]
torch.set_num_threads(1)
TOKEN = "test-token-123"
ROOT = Path(__file__).resolve().parents[1]


def _start_server(model_dir: Path, tmp: Path, i: int, discovery: Path, weights_root: Path) -> subprocess.Popen:
    port_file = tmp / f"port{i}"
    cmd = [sys.executable, "-m", "megatron_amir.rollout.server", "--model", str(model_dir), "--port", "0",
           "--port-file", str(port_file), "--register", str(discovery), "--api-key", TOKEN,
           "--weights-root", str(weights_root), "--max-batch-rows", "64"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp / f"server{i}.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    hf, cfg = tiny_hf_model("llama", seed=0)
    model_dir = tmp / "model"
    hf.save_pretrained(model_dir)
    discovery, weights_root = tmp / "servers.txt", tmp / "weights"
    weights_root.mkdir()
    procs = [_start_server(model_dir, tmp, i, discovery, weights_root) for i in range(3)]
    urls = []
    deadline = time.monotonic() + 90
    try:
        for i, p in enumerate(procs):
            pf = tmp / f"port{i}"
            while not pf.exists():
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server {i} did not start:\n{(tmp / f'server{i}.log').read_text()[-2000:]}")
                time.sleep(0.1)
            urls.append(pf.read_text().strip())
        router = VllmRouter(urls, policy="round_robin", log_file=tmp / "router.log").start()
        yield dict(tmp=tmp, hf=hf, cfg=cfg, urls=urls, procs=procs, router=router, discovery=discovery,
                   weights_root=weights_root)
        router.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_sigkill_mid_batch_every_group_exactly_once(fleet):
    G = 36
    prompts = [[(7 * i + j) % 500 + 1 for j in range(3 + i % 5)] for i in range(G)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=40, seed=1000 + i) for i in range(G)]
    rids = [f"group-{i}" for i in range(G)]
    victim_url, victim = fleet["urls"][2], fleet["procs"][2]
    client = FleetClient(fleet["router"].url, fleet["urls"], token=TOKEN, timeout_s=30, backoff_s=0.05,
                         concurrency=12)

    async def run():
        task = asyncio.create_task(client.generate(prompts, params, n=4, request_ids=rids))
        # kill the victim while it holds requests it has not answered (mid-batch)
        in_flight_at_kill = 0
        while not task.done():
            req, done = _metric(victim_url, "megatron_amir_requests_total"), _metric(victim_url, "megatron_amir_groups_total")
            if req - done >= 1:
                victim.send_signal(signal.SIGKILL)
                in_flight_at_kill = req - done
                break
            await asyncio.sleep(0.01)
        res = await task
        await client.aclose()
        return res, in_flight_at_kill

    results, in_flight = asyncio.run(run())
    assert in_flight >= 1, "the victim was not killed mid-batch"
    victim.wait(10)
    assert victim.returncode == -signal.SIGKILL
    assert [g.request_id for g in results] == rids  # every group exactly once, in order
    assert client.stats.groups_done == G and client.stats.duplicates_dropped == 0
    # Seeded requests reproduce on any server: compare each group with the same weights run locally (the
    # servers stop at the model's EOS by default, as vLLM does).
    local = EmbeddedEngine(fleet["cfg"], fleet["hf"].state_dict())
    ref = local.generate(prompts, [p.replace(stop_token_ids=(fleet["cfg"]["eos_token_id"],)) for p in params], n=4)
    for g, r in zip(results, ref):
        assert g.prompt_token_ids == r.prompt_token_ids
        assert len(g.samples) == 4
        assert [s.token_ids for s in g.samples] == [s.token_ids for s in r.samples]
        for s, t in zip(g.samples, r.samples):
            assert max(abs(a - b) for a, b in zip(s.logprobs, t.logprobs)) < 1e-4
            assert s.weight_version == 0


def test_weight_update_then_greedy_equals_trainer_model(fleet):
    trainer_model, _ = tiny_hf_model("llama", seed=5)  # the "trained" weights
    snap = write_snapshot(trainer_model.state_dict(), fleet["weights_root"], version=3, hf_config=fleet["cfg"])
    client = FleetClient(fleet["router"].url, fleet["urls"], token=TOKEN, timeout_s=30, backoff_s=0.05)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [11]]

    async def run():
        report = await client.update_weights_from_snapshot(snap, 3, skip_unreachable=True)
        versions = await client.weight_versions()
        groups = await client.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12), n=2)
        await client.aclose()
        return report, versions, groups

    report, versions, groups = asyncio.run(run())
    live = [u for u, p in zip(fleet["urls"], fleet["procs"]) if p.poll() is None]
    assert all(report[u] == "ok" for u in live)
    assert set(client.servers) == set(live)  # the SIGKILLed server was dropped from the fan-out list
    assert all(versions[u] == "3" for u in live)
    for prompt, g in zip(prompts, groups):
        ids = torch.tensor([prompt])
        out = trainer_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                     pad_token_id=0)
        ref = out[0, len(prompt):].tolist()
        assert [s.token_ids for s in g.samples] == [ref, ref]
        assert g.weight_version == 3 and all(s.weight_version == 3 for s in g.samples)


def test_auth_and_malformed_requests(fleet):
    url = fleet["urls"][0]
    snap_body = {"update_info": {"path": str(fleet["weights_root"]), "version": 1}}
    assert httpx.post(f"{url}/update_weights", json=snap_body).status_code == 401
    assert httpx.post(f"{url}/update_weights", json=snap_body,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(f"{url}/pause").status_code == 401
    bad_bodies = [
        {"prompt": "text, not token ids"},
        {"prompt": [[1, 2], []]},
        {"prompt": [1, 2, 100000]},
        {"prompt": [1, 2], "n": 0},
        {"prompt": [1, 2], "max_tokens": "many"},
        {"prompt": [1, 2], "logprobs": 5},
    ]
    for body in bad_bodies:
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert 400 <= r.status_code < 500, (body, r.status_code)
        assert r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3, "logprobs": 0,
                                                    "return_token_ids": True})
    ch = ok.json()["choices"][0]
    assert ok.status_code == 200, ok.text
    # three tokens, unless the model's EOS came first: it ends the sample (vLLM's default)
    eos = fleet["cfg"]["eos_token_id"]
    assert ch["token_ids"][:-1].count(eos) == 0
    assert (len(ch["token_ids"]) == 3 and ch["finish_reason"] == "length") or \
        (ch["token_ids"][-1] == eos and ch["finish_reason"] == "stop" and ch["stop_reason"] is None), ch
    assert _metric(url, "megatron_amir_requests_total") >= 1


def test_discovery_file_drives_router_workers(fleet):
    assert set(read_discovery_file(fleet["discovery"])) == set(fleet["urls"])  # servers registered themselves
    live = [u for u, p in zip(fleet["urls"], fleet["procs"]) if p.poll() is None]
    disc = fleet["tmp"] / "disc2.txt"
    disc.write_text(live[0] + "\n")
    seen = []
    with VllmRouter([], log_file=fleet["tmp"] / "router2.log") as router:
        w = DiscoveryWatcher(disc, router, on_change=seen.append)
        assert w.check() and router.list_workers() == [live[0]]
        disc.write_text("# fleet\n" + "\n".join(live) + "\n")
        assert w.check() and sorted(router.list_workers()) == sorted(live)
        disc.write_text(live[1] + "\n")
        assert w.check() and router.list_workers() == [live[1]]
        assert not w.check()  # unchanged file: nothing to do
        r = httpx.post(f"{router.url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    assert seen == [[live[0]], live, [live[1]]]


def test_gloo_broadcast_weight_update(fleet):
    """The collective path on CPU: tensors broadcast over gloo to every live server, announced with
    vLLM's update_info; then greedy outputs equal the trainer-side transformers model."""
    live = [u for u, p in zip(fleet["urls"], fleet["procs"]) if p.poll() is None]
    trainer_model, _ = tiny_hf_model("llama", seed=21)
    client = FleetClient(None, live, token=TOKEN, timeout_s=60, backoff_s=0.05)
    prompt = [2, 7, 1, 8]

    async def run():
        try:
            report = await client.update_weights_broadcast(trainer_model.state_dict(), 8)
            versions = await client.weight_versions()
            groups = await client.generate([prompt] * len(live), SamplingParams(temperature=0, max_new_tokens=10))
            return report, versions, groups
        finally:
            await client.aclose()

    report, versions, groups = asyncio.run(run())
    assert report == {u: "ok" for u in live} and set(versions.values()) == {"8"}
    ids = torch.tensor([prompt])
    ref = trainer_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    assert all(g.samples[0].token_ids == ref and g.weight_version == 8 for g in groups)  # direct mode: every server


@pytest.mark.parametrize("policy", ["power_of_two", "cache_aware", "random"])
def test_router_policies_serve(fleet, policy):
    live = [u for u, p in zip(fleet["urls"], fleet["procs"]) if p.poll() is None]
    with VllmRouter(live, policy=policy, log_file=fleet["tmp"] / f"router-{policy}.log") as router:
        client = FleetClient(router.url, live, timeout_s=30, backoff_s=0.05)

        async def run():
            try:
                return await client.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_new_tokens=3), n=2)
            finally:
                await client.aclose()

        groups = asyncio.run(run())
    assert [len(g.samples) for g in groups] == [2, 2] and all(len(s.token_ids) == 3 for g in groups for s in g.samples)


def test_direct_mode_fleet_engine(fleet):
    live = [u for u, p in zip(fleet["urls"], fleet["procs"]) if p.poll() is None]
    eng = FleetEngine([live[0]], use_router=False, token=TOKEN, sync_dir=fleet["weights_root"],
                      hf_config=fleet["cfg"], skip_unreachable=False, version=3,
                      update_route="collective_rpc")
    try:
        hf_b, _ = tiny_hf_model("llama", seed=9)
        eng.load_weights(hf_b.state_dict(), 4)
        assert eng.version == 4
        g = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=6), n=1)[0]
        local = EmbeddedEngine(fleet["cfg"], hf_b.state_dict()).generate([[1, 2, 3]], SamplingParams(temperature=0,
                                                                                               max_new_tokens=6))[0]
        assert g.samples[0].token_ids == local.samples[0].token_ids and g.weight_version == 4
    finally:
        eng.close()


def test_new_member_gets_current_weights_before_traffic(fleet):
    """A server that joins through the discovery file (a replacement, launched with other weights) is given
    the current snapshot before the engine sends it work: every sample carries the current version and the
    greedy outputs of both members equal the trainer-side model."""
    live = [u for u, p in zip(fleet["urls"], fleet["procs"]) if p.poll() is None]
    tmp, disc = fleet["tmp"], fleet["tmp"] / "disc_join.txt"
    disc.write_text(live[0] + "\n")
    eng = FleetEngine([], use_router=False, token=TOKEN, sync_dir=fleet["weights_root"], hf_config=fleet["cfg"],
                      discovery_file=disc, skip_unreachable=False)
    proc = None
    try:
        eng.watcher.stop()  # polls are driven by the test
        hf_b, _ = tiny_hf_model("llama", seed=13)
        eng.load_weights(hf_b.state_dict(), 5)
        proc = _start_server(tmp / "model", tmp, 9, disc, fleet["weights_root"])  # registers itself in disc
        deadline = time.monotonic() + 90
        while len(read_discovery_file(disc)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server9.log").read_text()[-2000:]
            time.sleep(0.1)
        new = [u for u in read_discovery_file(disc) if u != live[0]][0]
        assert eng.watcher.check() and eng.client.servers == [live[0], new]
        params = SamplingParams(temperature=0, max_new_tokens=6)
        local = EmbeddedEngine(fleet["cfg"], hf_b.state_dict()).generate([[1, 2, 3]], params)[0].samples[0].token_ids
        for _ in range(4):  # direct mode alternates between the two members
            g = eng.generate([[1, 2, 3]], params, n=1)[0]
            assert g.samples[0].weight_version == 5 and g.samples[0].token_ids == local
    finally:
        eng.close()
        if proc is not None:
            proc.terminate()
            proc.wait(10)
