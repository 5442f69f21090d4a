"""Bucketed weight updates on one machine, no process group: the packed-bucket layout and its receiving side, the
snapshot written bucket by bucket, and the embedded engine loading an update bucket by bucket (complete, and one
that stops part-way without rollback: previous version label, no generation until a complete update; with rollback:
tests/test_embedded_sleep_rollback.py)."""

import pytest
import torch

from megatron_amir.rollout.embedded import EmbeddedEngine, IncompleteWeights
from megatron_amir.rollout.engine import SamplingParams
from megatron_amir.rollout.weight_sync import PackedBuckets, read_snapshot, received_buckets, write_snapshot_stream
from rollout_helpers import tiny_hf_model

torch.set_num_threads(1)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(50, 8, generator=g), "b": torch.randn(8, 8, generator=g).to(torch.bfloat16),
            "c": torch.randn(7, generator=g).half(), "s": torch.tensor(3.5), "ids": torch.arange(5),
            "t": torch.randn(6, 4, generator=g).t()}


@pytest.mark.parametrize("bucket_bytes", [1, 300, 10**6])
def test_packed_buckets_round_trip_through_update_info(bucket_bytes):
    """What a receiver rebuilds from update_info and the flat buffers equals the sender's tensors, bit for bit."""
    t = _tensors()
    packed = PackedBuckets(t, bucket_bytes=bucket_bytes)
    info = packed.update_info()
    sent = iter(packed)
    got = {}
    for bucket in received_buckets(info, lambda buf: buf.copy_(next(sent).buffer)):
        got.update({n: v.clone() for n, v in bucket})
    assert list(got) == list(t)
    for k in t:
        assert got[k].dtype == t[k].dtype and torch.equal(got[k], t[k]), k
    assert all(b[0] <= max(bucket_bytes, 50 * 8 * 4) for b in info["buckets"])
    expected = {1: len(t), 10**6: 1}.get(bucket_bytes)
    assert len(info["buckets"]) == expected if expected else 1 < len(info["buckets"]) < len(t)


def test_received_buckets_rejects_bad_announcements():
    info = PackedBuckets(_tensors(), bucket_bytes=300).update_info()
    for field, value, msg in [("offsets", info["offsets"][:-1], "parallel lists"),
                              ("buckets", [[8, len(info["names"])]], "ends beyond its bucket"),
                              ("buckets", [[10**6, 1]], "covering every tensor"),
                              ("dtype_names", ["float99"] * len(info["names"]), "unsupported dtype")]:
        with pytest.raises(ValueError, match=msg):
            list(received_buckets({**info, field: value}, lambda buf: None))


def test_snapshot_written_bucket_by_bucket(tmp_path):
    t = _tensors()
    path = write_snapshot_stream(PackedBuckets(t, bucket_bytes=300), tmp_path, 3, hf_config={"x": 1})
    snap = read_snapshot(path, expected_version=3)
    assert set(snap.tensors) == set(t) and all(torch.equal(snap.tensors[k], t[k]) for k in t)
    assert len(snap.manifest["files"]) == len(PackedBuckets(t, bucket_bytes=300).sizes) > 1
    with pytest.raises(ValueError, match="duplicate"):
        write_snapshot_stream([[("a", t["a"])], [("a", t["a"])]], tmp_path, 4)


def test_embedded_engine_bucket_update_and_one_that_stops_part_way():
    old, cfg = tiny_hf_model("llama", seed=0)
    new, _ = tiny_hf_model("llama", seed=5)
    engine = EmbeddedEngine(cfg, old.state_dict(), version=1)
    reference = EmbeddedEngine(cfg, new.state_dict(), version=2)
    sp = SamplingParams(temperature=0, max_new_tokens=6)
    prompt = [[3, 1, 4, 1, 5]]

    def stops_after_first(buckets):
        for i, b in enumerate(buckets):
            if i == 1:
                raise ConnectionError("sender died")
            yield b

    with pytest.raises(ConnectionError):
        engine.load_weight_buckets(stops_after_first(PackedBuckets(new.state_dict(), bucket_bytes=20000)), 2,
                                   rollback=False)
    assert engine.version == 1 and "stopped part-way" in engine.incomplete_update
    with pytest.raises(IncompleteWeights):
        engine.generate(prompt, sp)
    n = engine.load_weight_buckets(PackedBuckets(new.state_dict(), bucket_bytes=20000), 2)
    assert n == len(reference.model.expected_names()) and engine.version == 2 and engine.incomplete_update is None
    assert engine.generate(prompt, sp)[0].samples[0].token_ids == reference.generate(prompt, sp)[0].samples[0].token_ids
    with pytest.raises(KeyError, match="missing weights"):  # an update that lacks tensors is not complete either
        engine.load_weight_buckets([list(old.state_dict().items())[:3]], 3, rollback=False)
    assert engine.version == 2 and engine.incomplete_update
