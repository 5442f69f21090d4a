"""The embedded engine's sleep mode (vLLM's semantics, so the trainer's colocated sleep/wake order is tested on CPU)
and its rollback of an update that stops part-way (rollout.weight_sync_rollback).

Sleep: level 1 keeps the weights in host memory and gives them back bit for bit; level 2 discards them, and the
woken weights serve nothing until an update has loaded; while asleep nothing generates or loads. Rollback: an update
that stops after some buckets were loaded leaves the previous version's weights (compared tensor by tensor with a
copy taken before) and the engine keeps serving them."""

import pytest
import torch

from megatron_amir.rollout.embedded import EmbeddedEngine, EngineAsleep, IncompleteWeights
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.weight_sync import PackedBuckets
from rollout_helpers import tiny_hf_model

torch.set_num_threads(1)
SP = SamplingParams(temperature=0, max_new_tokens=6)
PROMPT = [[3, 1, 4, 1, 5]]


def _weights(engine: EmbeddedEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _greedy(engine: EmbeddedEngine) -> list[int]:
    return engine.generate(PROMPT, SP)[0].samples[0].token_ids


def test_level_1_sleep_keeps_weights_in_host_memory_and_refuses_work_while_asleep():
    model, cfg = tiny_hf_model("llama", seed=0)
    engine = EmbeddedEngine(cfg, model.state_dict())
    before, out = _weights(engine), _greedy(engine)
    engine.sleep(1)
    assert engine.asleep == ("weights", "kv_cache")
    assert all(p.untyped_storage().nbytes() == 0 for p in engine.model.parameters())  # the memory is released
    with pytest.raises(EngineAsleep, match="weights are asleep"):
        engine.generate(PROMPT, SP)
    with pytest.raises(EngineAsleep, match="wake_up"):
        engine.load_weight_buckets(PackedBuckets(model.state_dict()), 1)
    with pytest.raises(EngineAsleep):
        engine.sleep(1)
    engine.wake_up(["weights"])
    with pytest.raises(EngineAsleep, match="kv_cache are asleep"):  # the KV cache is still released
        engine.generate(PROMPT, SP)
    engine.wake_up(["kv_cache"])
    assert engine.asleep == () and _same(_weights(engine), before) and _greedy(engine) == out
    with pytest.raises(ValueError, match="level"):
        engine.sleep(3)
    with pytest.raises(ValueError, match="tags"):
        engine.wake_up(["weight"])


def test_level_2_sleep_discards_weights_until_an_update_loads():
    old, cfg = tiny_hf_model("llama", seed=0)
    new, _ = tiny_hf_model("llama", seed=5)
    engine = EmbeddedEngine(cfg, old.state_dict(), version=1)
    reference = EmbeddedEngine(cfg, new.state_dict())
    engine.sleep(2)
    engine.wake_up()  # the wrong order: woken without an update, the weights hold nothing
    with pytest.raises(IncompleteWeights, match="discarded"):
        engine.generate(PROMPT, SP)
    engine.sleep(2)
    engine.wake_up(["weights"])  # the right order: weights, the update into them, then the KV cache
    engine.load_weight_buckets(PackedBuckets(new.state_dict(), bucket_bytes=20000), 2)
    engine.wake_up(["kv_cache"])
    assert engine.version == 2 and _same(_weights(engine), _weights(reference))
    assert _greedy(engine) == _greedy(reference)


def _stops_after(buckets, n: int):
    for i, b in enumerate(buckets):
        if i == n:
            raise ConnectionError("sender died")
        yield b


@pytest.mark.parametrize("asleep_before", [False, True])
def test_update_that_stops_part_way_rolls_back_to_the_previous_version(asleep_before):
    old, cfg = tiny_hf_model("llama", seed=0)
    new, _ = tiny_hf_model("llama", seed=5)
    engine = EmbeddedEngine(cfg, old.state_dict(), version=1)
    if asleep_before:  # level 1 round trip first: the rollback copies are taken from the woken weights
        engine.sleep(1)
        engine.wake_up(["weights"])
        engine.wake_up(["kv_cache"])
    before, out = _weights(engine), _greedy(engine)
    packed = PackedBuckets(new.state_dict(), bucket_bytes=20000)
    assert len(packed.sizes) > 3
    with pytest.raises(ConnectionError):
        engine.load_weight_buckets(_stops_after(packed, 3), 2)
    assert engine.version == 1 and engine.incomplete_update is None
    assert _same(_weights(engine), before) and _greedy(engine) == out
    with pytest.raises(KeyError, match="missing weights"):  # an incomplete announcement is rolled back too
        engine.load_weight_buckets([list(new.state_dict().items())[:3]], 3)
    assert engine.version == 1 and _same(_weights(engine), before)
    # without the rollback copy the same failure leaves a mix of versions that serves nothing
    with pytest.raises(ConnectionError):
        engine.load_weight_buckets(_stops_after(PackedBuckets(new.state_dict(), bucket_bytes=20000), 3), 2,
                                   rollback=False)
    assert engine.version == 1 and "stopped part-way" in engine.incomplete_update
    assert not _same(_weights(engine), before)
    with pytest.raises(IncompleteWeights):
        engine.generate(PROMPT, SP)
