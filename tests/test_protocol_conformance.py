"""The embedded server (``megatron-amir serve``) against the OpenAI completions protocol as the real
``openai`` Python client and its pydantic types define it, plus the vLLM defaults RL relies on (EOS stops a
sample, usage counts each prompt once). The request corpus is data in protocol_corpus.py."""

import json

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from openai.types import Completion, Model

from megatron_amir.rollout.embedded import EmbeddedEngine
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.server import create_app
from protocol_corpus import CASES, with_model
from rollout_helpers import tiny_hf_model  # pytest puts tests/ on sys.path (no __init__.py)

torch.set_num_threads(1)
# generous: the fixture builds two tiny models (the first import of transformers is slow on a busy machine)
pytestmark = pytest.mark.timeout(300)
MODEL = "tiny-llama"
PROMPT = [5, 6, 7]


def _eos_engine():
    """A tiny model whose EOS is a token it actually emits: the third greedy token after PROMPT (one that
    does not occur before it), so the EOS default is observable both greedily and when sampling."""
    hf, cfg = tiny_hf_model("llama", max_position_embeddings=128)
    free = EmbeddedEngine(cfg, hf.state_dict(), seed=0)
    greedy = free.generate([PROMPT], SamplingParams(temperature=0, max_new_tokens=12))[0].samples[0].token_ids
    pos = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    eos = greedy[pos]
    eng = EmbeddedEngine(dict(cfg, eos_token_id=eos), hf.state_dict(), seed=0)
    return eng, eos, greedy[: pos + 1], free


@pytest.fixture(scope="module")
def server():
    eng, eos, greedy_to_eos, free = _eos_engine()
    with TestClient(create_app(eng, "tok", model_name=MODEL)) as http:
        client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="EMPTY", http_client=http, max_retries=0)
        yield {"http": http, "client": client, "eos": eos, "greedy_to_eos": greedy_to_eos, "free": free}


def _check_error_shape(resp, param):
    """vLLM's ErrorResponse: {"error": {"message": str, "type": str, "param": str | None, "code": int}}."""
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    assert err["code"] == resp.status_code and err["param"] == param, err


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_corpus(server, case):
    http = server["http"]
    body = with_model(case, MODEL)
    kw = {"json": body} if isinstance(body, dict) else {"content": body} if body is not None else {}
    if isinstance(body, str):
        kw["headers"] = {"content-type": "application/json"}
    r = http.request(case["method"], case["path"], **kw)
    assert r.status_code == case["status"], r.text
    if r.status_code >= 400:
        _check_error_shape(r, case["param"])
    elif case["path"] == "/v1/completions":
        out = Completion.model_validate_json(r.text, strict=True)
        n = body.get("n", 1) * (len(body["prompt"]) if isinstance(body["prompt"][0], list) else 1)
        assert [c.index for c in out.choices] == list(range(n)) and out.model == MODEL
    elif case["path"] == "/v1/models":
        data = r.json()
        assert data["object"] == "list" and [Model.model_validate(m, strict=True).id for m in data["data"]] == [MODEL]


def test_openai_client_completion_with_vllm_extras(server):
    """What TRL's async GRPO sends, through the client: token-id prompts, n, seed, logprobs=0 and vLLM's extra
    fields; the client parses the answer into its types, token ids and log-probs line up."""
    client = server["client"]
    out = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], n=3, max_tokens=5, temperature=0.9,
                                    seed=3, logprobs=0,
                                    extra_body={"top_k": -1, "return_token_ids": True, "stop_token_ids": [9]})
    assert isinstance(out, Completion) and out.object == "text_completion" and len(out.choices) == 6
    Completion.model_validate(out.model_dump(), strict=True)
    for c in out.choices:
        ids = c.model_extra["token_ids"]
        assert len(ids) == len(c.logprobs.token_logprobs) == len(c.logprobs.tokens) >= 1
        assert c.finish_reason in ("stop", "length") and all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert [c.model_extra["prompt_token_ids"] for c in out.choices] == [[1, 2, 3]] * 3 + [[4, 5]] * 3


def test_usage_counts_each_prompt_once(server):
    out = server["client"].completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], n=4, max_tokens=3, seed=1,
                                              extra_body={"return_token_ids": True})
    generated = sum(len(c.model_extra["token_ids"]) for c in out.choices)
    assert out.usage.prompt_tokens == 5  # vLLM: 3 + 2, not (3 + 2) * n
    assert out.usage.completion_tokens == generated and out.usage.total_tokens == 5 + generated


@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("frequency_penalty", 1.0), ("best_of", 2),
                                         ("logit_bias", {"7": 5})])
def test_openai_client_sees_a_400_naming_unsupported_fields(server, field, value):
    """Fields of the client's own signature: the client raises BadRequestError whose body names the field."""
    with pytest.raises(openai.BadRequestError) as info:
        server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **{field: value})
    assert info.value.status_code == 400 and info.value.body["param"] == field
    assert field in info.value.body["message"]


@pytest.mark.parametrize("field,value", [("repetition_penalty", 1.3), ("min_p", 0.05), ("min_tokens", 3),
                                         ("ignore_eos", True), ("prompt_logprobs", 0)])
def test_openai_client_sees_a_400_naming_unsupported_vllm_extras(server, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={field: value})
    assert info.value.body["param"] == field


def test_non_finite_temperature_is_a_400_naming_it(server):
    http = server["http"]
    for raw in ("Infinity", "-Infinity", "NaN"):
        r = http.post("/v1/completions", content=f'{{"prompt": [1], "max_tokens": 2, "temperature": {raw}}}',
                      headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["param"] == "temperature" and "finite" in r.json()["error"]["message"], raw


def test_eos_stops_by_default_greedy(server):
    """Greedy decoding runs into the model's EOS at a known step: the sample ends there (EOS kept in token_ids,
    as vLLM returns it), finish_reason stop and stop_reason null (vLLM's value for EOS)."""
    out = server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                              extra_body={"return_token_ids": True})
    c = out.choices[0]
    assert c.model_extra["token_ids"] == server["greedy_to_eos"]
    assert c.finish_reason == "stop" and c.model_extra["stop_reason"] is None
    # an explicit stop token still reports itself as the stop_reason
    first = server["greedy_to_eos"][0]
    out = server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                              extra_body={"return_token_ids": True, "stop_token_ids": [first]})
    assert out.choices[0].model_extra["token_ids"] == [first] and out.choices[0].model_extra["stop_reason"] == first


def test_eos_stops_by_default_sampled(server):
    """64 samples: none continues past EOS; each that emitted it finishes with "stop", the rest with "length".
    Without the default stop the same seed gives samples that run past EOS (checked on the same weights)."""
    eos, body = server["eos"], dict(model=MODEL, prompt=PROMPT, n=64, max_tokens=16, temperature=1.0, seed=11)
    out = server["client"].completions.create(**body, extra_body={"return_token_ids": True})
    stopped = 0
    for c in out.choices:
        ids = c.model_extra["token_ids"]
        assert eos not in ids[:-1], ids
        if ids[-1] == eos:
            stopped += 1
            assert c.finish_reason == "stop" and c.model_extra["stop_reason"] is None
        else:
            assert c.finish_reason == "length" and len(ids) == 16
    free = server["free"].generate([PROMPT], SamplingParams(temperature=1.0, max_new_tokens=16, seed=11), n=64)[0]
    past = sum(eos in s.token_ids[:-1] for s in free.samples)
    assert stopped >= 1 and past >= 1, (stopped, past)  # the check is not vacuous


def test_models_list_through_the_client(server):
    models = server["client"].models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].created > 0
    Model.model_validate(models[0].model_dump(), strict=True)


def test_unknown_route_and_method_in_openai_error_shape(server):
    http = server["http"]
    r = http.get("/v1/no_such_route")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers.get("allow", "")
    _check_error_shape(r, None)
    with pytest.raises(openai.NotFoundError) as info:  # the client reads the message out of the error shape
        server["client"].get("/no_such_route", cast_to=object)
    assert "/v1/no_such_route" in info.value.message and json.dumps(info.value.body)
