"""In-process checks of the HTTP server (FastAPI TestClient) and of the fleet client's retry and
exactly-once accounting (httpx MockTransport)."""

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from megatron_amir.rollout.client import FleetClient, FleetError, completion_body
from megatron_amir.rollout.embedded import EmbeddedEngine
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.server import create_app
from megatron_amir.rollout.weight_sync import write_snapshot
from rollout_helpers import tiny_hf_model  # pytest puts tests/ on sys.path (no __init__.py)

torch.set_num_threads(1)
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    hf, cfg = tiny_hf_model("qwen2")
    eng = EmbeddedEngine(cfg, hf.state_dict())
    root = tmp_path_factory.mktemp("weights")
    with TestClient(create_app(eng, "s3cret", weights_root=str(root))) as c:
        yield c, eng, hf, cfg, root


def test_completion_matches_engine_and_vllm_shape(served):
    c, eng, hf, cfg, _ = served
    body = completion_body([1, 2, 3], SamplingParams(temperature=0.9, max_new_tokens=6, seed=4), 3, None)
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and [ch["index"] for ch in out["choices"]] == [0, 1, 2]
    ref = eng.generate([[1, 2, 3]], SamplingParams(temperature=0.9, max_new_tokens=6, seed=4), n=3)[0]
    for ch, s in zip(out["choices"], ref.samples):
        assert ch["token_ids"] == s.token_ids and ch["finish_reason"] == s.finish_reason
        assert ch["logprobs"]["token_logprobs"] == pytest.approx(s.logprobs, abs=1e-5)
    # two prompts in one request: prompt-major choices
    r = c.post("/v1/completions", json={"prompt": [[1, 2], [3, 4, 5]], "n": 2, "max_tokens": 2,
                                        "return_token_ids": True, "temperature": 0.8, "seed": 1})
    ch = r.json()["choices"]
    assert [x["prompt_token_ids"] for x in ch] == [[1, 2], [1, 2], [3, 4, 5], [3, 4, 5]]


def test_state_changing_routes_need_token(served):
    c = served[0]
    for path in ["/pause", "/resume", "/start_weight_update", "/update_weights", "/finish_weight_update",
                 "/update_weight_version", "/init_weight_transfer_engine", "/collective_rpc", "/reset_prefix_cache"]:
        assert c.post(path, json={}).status_code == 401, path
        assert c.post(path, json={}, headers={"Authorization": "Bearer nope"}).status_code == 401, path
    assert c.get("/health").status_code == 200 and c.get("/weight_info").status_code == 200


def test_no_token_means_disabled():
    hf, cfg = tiny_hf_model("llama")
    with TestClient(create_app(EmbeddedEngine(cfg, hf.state_dict()), None)) as c:
        assert c.post("/pause", headers={"Authorization": "Bearer anything"}).status_code == 403


def test_file_weight_update_version_and_rejections(served):
    c, eng, hf, cfg, root = served
    new, _ = tiny_hf_model("qwen2", seed=3)
    snap = write_snapshot(new.state_dict(), root, version=11, hf_config=cfg)
    assert c.post("/start_weight_update", json={"is_checkpoint_format": True}, headers=AUTH).status_code == 200
    r = c.post("/update_weights", json={"update_info": {"path": str(snap), "version": 11}}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert c.post("/finish_weight_update", headers=AUTH).status_code == 200
    assert c.get("/weight_info").json() == {"weight_version": "11", "logprobs_mode": "processed_logprobs"}
    out = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0,
                                          "return_token_ids": True}).json()
    ids = torch.tensor([[5, 6, 7]])
    ref = new.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out["choices"][0]["token_ids"] == ref[0, 3:].tolist() and out["weight_version"] == 11
    # bad updates leave weights and version alone
    assert c.post("/update_weights", json={"update_info": {"path": str(snap), "version": 12}},
                  headers=AUTH).status_code == 400  # manifest says 11
    assert c.post("/update_weights", json={"update_info": {"path": "/etc", "version": 1}},
                  headers=AUTH).status_code == 403  # outside the weights root
    assert c.post("/update_weights", json={"update_info": "x"}, headers=AUTH).status_code == 400
    assert c.post("/init_weight_transfer_engine", json={"init_info": {"backend": "nccl"}},
                  headers=AUTH).status_code == 400
    assert c.post("/init_weight_transfer_engine", json={"init_info": {"backend": "gloo", "master_port": 1}},
                  headers=AUTH).status_code == 400
    r = c.post("/update_weights", json={"update_info": {"names": ["x"], "dtype_names": ["float32"], "shapes": [[1]]}},
               headers=AUTH)
    assert r.status_code == 400 and "init_weight_transfer_engine" in r.json()["error"]["message"]
    assert c.get("/weight_info").json() == {"weight_version": "11", "logprobs_mode": "processed_logprobs"}
    assert c.post("/update_weight_version", json={"new_version": "12"}, headers=AUTH).json() == \
        {"success": True, "new_version": "12"}
    assert c.post("/update_weight_version", json={"weight_version": "1"}, headers=AUTH).status_code == 400
    assert eng.version == 12
    # the vLLM worker-extension route loads the same snapshot
    r = c.post("/collective_rpc", json={"method": "load_snapshot", "args": [str(snap), 11]}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"results": [len(new.state_dict())]}
    assert eng.version == 11
    assert c.post("/collective_rpc", json={"method": "execute_model"}, headers=AUTH).status_code == 400


def test_pause_holds_generation_until_resume(served):
    c = served[0]
    assert c.post("/pause", params={"mode": "wait"}, headers=AUTH).json()["message"] == "Generation paused"
    assert c.get("/is_paused").json() == {"is_paused": True}
    got = {}

    def request():
        got["r"] = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})

    t = threading.Thread(target=request)
    t.start()
    time.sleep(0.5)
    assert "r" not in got  # held while paused
    c.post("/resume", headers=AUTH)
    t.join(30)
    assert got["r"].status_code == 200
    assert c.post("/pause", params={"mode": "bogus"}, headers=AUTH).status_code == 400


def test_pause_abort_answers_every_queued_request_with_503_and_counts_http_requests(served):
    """mode=abort: queued generations end with a 503 for each waiting HTTP request, a client retry joined to
    one included; aborted_requests counts those requests; after resume the server generates again."""
    with TestClient(create_app(served[1], "s3cret")) as c:  # its own server: the counters start at zero
        _pause_abort(c)


def _await_metric(c, line, timeout_s=30.0):
    """Poll /metrics until it has ``line`` (a queue length, a counter value)."""
    deadline = time.time() + timeout_s
    while line not in c.get("/metrics").text:
        assert time.time() < deadline, f"/metrics never showed {line!r}"
        time.sleep(0.05)


def _pause_abort(c):
    assert c.post("/pause", params={"mode": "wait"}, headers=AUTH).status_code == 200
    got: dict[str, httpx.Response] = {}
    a = {"prompt": [1, 2], "max_tokens": 2}

    def request(name, body, rid):
        got[name] = c.post("/v1/completions", json=body, headers={"x-request-id": rid})

    threads = [threading.Thread(target=request, args=("a", a, "req-a")),
               threading.Thread(target=request, args=("b", {"prompt": [3], "max_tokens": 2}, "req-b"))]
    for t in threads:
        t.start()
    _await_metric(c, "megatron_amir_queue_requests 2")
    retry = threading.Thread(target=request, args=("a2", a, "req-a"))  # the client's retry of a, same id and body
    retry.start()
    _await_metric(c, "megatron_amir_deduplicated_requests_total 1")
    r = c.post("/pause", params={"mode": "abort"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["aborted_requests"] == 3
    for t in (*threads, retry):
        t.join(30)
    for name in ("a", "b", "a2"):
        assert got[name].status_code == 503 and "mode=abort" in got[name].json()["error"]["message"]
    assert "megatron_amir_queue_requests 0" in c.get("/metrics").text
    c.post("/resume", headers=AUTH)
    assert c.post("/v1/completions", json=a, headers={"x-request-id": "req-a"}).status_code == 200


# ------------------------------------------------------------------------------------------- client
def _fake_fleet(behaviour):
    """A MockTransport answering /v1/completions; behaviour(rid, attempt) -> 'ok' | status | 'drop' | 'short'."""
    attempts: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        rid = request.headers["x-request-id"]
        attempts[rid] = attempts.get(rid, 0) + 1
        body = json.loads(request.content)
        what = behaviour(rid, attempts[rid])
        if what == "drop":
            raise httpx.ConnectError("connection refused", request=request)
        if isinstance(what, int):
            return httpx.Response(what, json={"error": {"message": "nope"}})
        n = body["n"] if what == "ok" else body["n"] - 1
        choices = [{"index": i, "token_ids": [body["prompt"][0], i], "finish_reason": "length",
                    "logprobs": {"token_logprobs": [-1.0, -2.0]}} for i in range(n)]
        return httpx.Response(200, json={"choices": choices, "weight_version": 2})

    return httpx.MockTransport(handler), attempts


def _client(transport, **kw):
    c = FleetClient("http://router", ["http://a", "http://b"], token="t", backoff_s=0.001, **kw)
    c._http = httpx.AsyncClient(transport=transport)
    return c


def test_client_retries_and_counts_each_group_once():
    def behaviour(rid, attempt):
        k = int(rid.split("-")[1])
        if k % 4 == 1 and attempt == 1:
            return 503
        if k % 4 == 2 and attempt <= 2:
            return "drop"
        if k % 4 == 3 and attempt == 1:
            return "short"  # truncated answer from a dying server
        return "ok"

    transport, attempts = _fake_fleet(behaviour)
    client = _client(transport)
    rids = [f"g-{k}" for k in range(12)]
    groups = asyncio.run(client.generate([[k + 1] for k in range(12)], SamplingParams(max_new_tokens=2), n=3,
                                         request_ids=rids))
    assert [g.request_id for g in groups] == rids
    assert [g.samples[0].token_ids[0] for g in groups] == [k + 1 for k in range(12)]
    assert all(len(g.samples) == 3 and g.weight_version == 2 for g in groups)
    assert [attempts[r] for r in rids] == [1, 2, 3, 2] * 3
    assert client.stats.groups_done == 12 and client.stats.retries == 3 * (1 + 2 + 1)


def test_client_does_not_retry_bad_requests_and_gives_up():
    transport, attempts = _fake_fleet(lambda rid, a: 400 if rid == "g-0" else 503)
    client = _client(transport, max_attempts=3)
    with pytest.raises(FleetError, match="2 of 2 groups failed"):
        asyncio.run(client.generate([[1], [2]], SamplingParams(), n=1, request_ids=["g-0", "g-1"]))
    assert attempts == {"g-0": 1, "g-1": 3}
    with pytest.raises(ValueError, match="unique"):
        asyncio.run(client.generate([[1], [2]], SamplingParams(), request_ids=["x", "x"]))


def test_snapshot_symlinks_oversized_requests_and_tiny_temperatures(served, tmp_path):
    """A snapshot file that is a symlink (it could point outside --weights-root) is refused; a rejected snapshot
    leaves weights and version untouched; prompts x n above --max-request-rows, a top_k beyond int32 get a 400;
    a temperature below 1e-5 is greedy (it gave NaN log-probs and a 500)."""
    import os

    c, eng, hf, cfg, root = served
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    version = eng.version
    outside = tmp_path / "outside"
    snap = write_snapshot(tiny_hf_model("qwen2", seed=5)[0].state_dict(), outside, version=90, hf_config=cfg)
    linked = root / "v00000090"
    linked.mkdir()
    for f in snap.iterdir():
        os.symlink(f, linked / f.name)
    r = c.post("/update_weights", json={"update_info": {"path": str(linked), "version": 90}}, headers=AUTH)
    assert r.status_code == 400 and "symbolic link" in r.text
    bad = dict(tiny_hf_model("qwen2", seed=6)[0].state_dict())
    last = sorted(bad)[-1]
    bad[last] = bad[last][..., :1].contiguous()  # the last tensor has the wrong shape
    snap_bad = write_snapshot(bad, root, version=91, hf_config=cfg)
    r = c.post("/update_weights", json={"update_info": {"path": str(snap_bad), "version": 91}}, headers=AUTH)
    assert r.status_code == 400 and eng.version == version
    assert all(torch.equal(v, before[k]) for k, v in eng.model.state_dict().items())  # nothing half-loaded
    assert c.post("/v1/completions", json={"prompt": [[1, 2]] * 20, "n": 1000, "max_tokens": 2}).status_code == 400
    assert c.post("/v1/completions", json={"prompt": [1, 2], "top_k": 2**64, "max_tokens": 2}).status_code == 400
    r = c.post("/v1/completions", json={"prompt": [1, 2], "temperature": 1e-40, "max_tokens": 3, "logprobs": 0,
                                        "return_token_ids": True})
    greedy = c.post("/v1/completions", json={"prompt": [1, 2], "temperature": 0, "max_tokens": 3,
                                             "return_token_ids": True})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == greedy.json()["choices"][0]["token_ids"]


def test_retry_of_an_in_flight_request_joins_it(served):
    """A client retry (same x-request-id and body) of a request still queued or running waits for that
    generation instead of queueing a second one; the same id with another body is a different request; a retry
    of a finished seeded request regenerates the identical answer, alone or batched with others."""
    c, eng = served[0], served[1]
    calls = []
    orig = eng.generate

    def counting(prompts, *a, **k):
        calls.append(len(prompts))
        return orig(prompts, *a, **k)

    eng.generate = counting
    try:
        body = {"prompt": [1, 2, 3], "n": 2, "max_tokens": 3, "temperature": 0.8, "seed": 5, "return_token_ids": True}
        other = dict(body, seed=6)
        assert c.post("/pause", params={"mode": "wait"}, headers=AUTH).status_code == 200
        got = {}

        def send(name, b):
            got[name] = c.post("/v1/completions", json=b, headers={"x-request-id": "grp-7"})

        threads = [threading.Thread(target=send, args=(k, b)) for k, b in (("a", body), ("b", body), ("c", other))]
        for t in threads:
            t.start()
            time.sleep(0.3)  # a, then its retry b, then c
        metrics = c.get("/metrics").text
        assert "megatron_amir_queue_requests 2" in metrics  # a (joined by b) and c
        assert "megatron_amir_deduplicated_requests_total 1" in metrics
        c.post("/resume", headers=AUTH)
        for t in threads:
            t.join(30)
        assert all(got[k].status_code == 200 for k in "abc")
        assert got["a"].json()["choices"] == got["b"].json()["choices"]
        assert got["c"].json()["choices"] != got["a"].json()["choices"]
        assert sum(calls) == 2  # one generation for a+b, one for c
        # a retry of a finished request (its answer lost on the way back) is generated again: the same seed gives
        # the identical answer, so the server keeps no answer cache (it would save only this generation's CPU)
        again = c.post("/v1/completions", json=body, headers={"x-request-id": "grp-7"}).json()
        assert sum(calls) == 3 and again["choices"] == got["a"].json()["choices"]
        # ... also when it lands in a batch with other requests
        assert c.post("/pause", params={"mode": "wait"}, headers=AUTH).status_code == 200
        threads = [threading.Thread(target=send, args=(k, b)) for k, b in (("d", dict(body, prompt=[9, 8])),
                                                                            ("e", body))]
        for t in threads:
            t.start()
        _await_metric(c, "megatron_amir_queue_requests 2")
        c.post("/resume", headers=AUTH)
        for t in threads:
            t.join(30)
        assert got["e"].json()["choices"] == got["a"].json()["choices"]
    finally:
        eng.generate = orig
        c.post("/resume", headers=AUTH)


def test_failed_broadcast_update_drops_the_group():
    """After a broadcast update fails on a member, the group is not reused: the next update forms a new one."""
    from megatron_amir.rollout import weight_sync

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/update_weights":
            return httpx.Response(400, json={"error": {"message": "bad update_info"}})
        return httpx.Response(200, json={})

    class FakeComm:
        def broadcast(self, t):
            pass

    c = _client(httpx.MockTransport(handler))
    c._bcast, c._bcast_servers = FakeComm(), list(c.servers)
    formed = []
    orig = weight_sync.TensorBroadcaster.gloo
    weight_sync.TensorBroadcaster.gloo = classmethod(lambda cls, *a, **k: formed.append(a) or FakeComm())
    try:
        with pytest.raises(FleetError, match="bad update_info"):
            asyncio.run(c.update_weights_broadcast({"w": torch.ones(2)}, 3, master_port=29999))
        assert c._bcast is None and "/resume" in seen and not formed
        seen.clear()
        with pytest.raises(FleetError):
            asyncio.run(c.update_weights_broadcast({"w": torch.ones(2)}, 4, master_port=29999))
        assert len(formed) == 1 and seen.count("/init_weight_transfer_engine") == 2  # re-formed, both re-joined
    finally:
        weight_sync.TensorBroadcaster.gloo = orig
