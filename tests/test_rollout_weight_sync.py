"""File weight sync: round trip (incl. bf16, shards), atomic layout, sha256/size/version checks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_amir.rollout.weight_sync import (
    LATEST,
    WeightSyncError,
    latest_snapshot,
    list_snapshots,
    read_snapshot,
    write_snapshot,
)

torch.set_num_threads(1)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(50, 8, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(8, generator=g).half(),
        "model.norm.weight": torch.ones(8),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(5),
        "non_contiguous": torch.randn(6, 4, generator=g).t(),
    }


def test_round_trip_and_safetensors_compatible(tmp_path):
    t = _tensors()
    p = write_snapshot(t, tmp_path, version=7, hf_config={"model_type": "llama"}, max_shard_bytes=600)
    assert p.name == "v00000007" and (tmp_path / LATEST).read_text().strip() == p.name
    assert latest_snapshot(tmp_path) == p
    s = read_snapshot(p, expected_version=7)
    assert s.version == 7 and s.manifest["hf_config"] == {"model_type": "llama"}
    assert set(s.tensors) == set(t)
    for k in t:
        assert s.tensors[k].dtype == t[k].dtype and torch.equal(s.tensors[k], t[k]), k
    files = sorted(p.glob("*.safetensors"))
    assert len(files) > 1  # sharded by max_shard_bytes
    merged = {}
    for f in files:  # the stock safetensors reader accepts our files
        merged.update(load_file(str(f)))
    assert all(torch.equal(merged[k], t[k]) for k in t)
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]  # no temp dirs left behind


def test_corruption_and_mismatch_are_detected(tmp_path):
    p = write_snapshot(_tensors(), tmp_path, version=1)
    f = next(p.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(WeightSyncError, match="sha256 mismatch"):
        read_snapshot(p)
    read_snapshot(p, verify=False)  # same size, so only the hash catches it
    with pytest.raises(WeightSyncError, match="expected 2"):
        read_snapshot(p, verify=False, expected_version=2)
    f.write_bytes(bytes(data[:-8]))
    with pytest.raises(WeightSyncError, match="size"):
        read_snapshot(p)
    f.unlink()
    with pytest.raises(WeightSyncError, match="missing"):
        read_snapshot(p)
    with pytest.raises(WeightSyncError, match="manifest not found"):
        read_snapshot(tmp_path)
    m = json.loads((p / "manifest.json").read_text())
    m["files"]["../evil.safetensors"] = m["files"].pop(next(iter(m["files"])))
    (p / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(WeightSyncError, match="bad file entry"):
        read_snapshot(p)


def test_versions_prune_and_rewrite(tmp_path):
    for v in range(1, 5):
        write_snapshot({"w": torch.full((3,), float(v))}, tmp_path, v, keep_last=2)
    assert [v for v, _ in list_snapshots(tmp_path)] == [3, 4]
    p = write_snapshot({"w": torch.full((3,), 40.0)}, tmp_path, 4, keep_last=2)  # retried sync replaces
    assert torch.equal(read_snapshot(p).tensors["w"], torch.full((3,), 40.0))
    with pytest.raises(ValueError, match="no tensors"):
        write_snapshot({}, tmp_path, 9)
    with pytest.raises(TypeError, match="complex"):
        write_snapshot({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path, 9)
    assert [v for v, _ in list_snapshots(tmp_path)] == [3, 4]


@pytest.mark.parametrize("keep_last", [2, None])
def test_resumed_trainer_writes_an_older_version(tmp_path, keep_last):
    """A trainer that crashed after syncing v5..v6 and resumed from its v3 checkpoint writes v3 again: that
    snapshot must survive the pruning and the abandoned run's newer ones must go (they would be 'latest')."""
    for v in (4, 5, 6):
        write_snapshot({"w": torch.full((3,), float(v))}, tmp_path, v, keep_last=keep_last)
    p = write_snapshot({"w": torch.full((3,), 30.0)}, tmp_path, 3, keep_last=keep_last)
    assert p.is_dir() and latest_snapshot(tmp_path) == p
    assert torch.equal(read_snapshot(p).tensors["w"], torch.full((3,), 30.0))
    assert [v for v, _ in list_snapshots(tmp_path)] == [3]
    write_snapshot({"w": torch.full((3,), 4.0)}, tmp_path, 4, keep_last=keep_last)
    assert [v for v, _ in list_snapshots(tmp_path)] == [3, 4]


def test_broadcast_rendezvous_listens_only_on_the_given_address():
    """The gloo weight-broadcast store listens on the master address only (TCPStore alone binds every
    interface, exposing an unauthenticated store to the network); the broadcast itself still works."""
    import threading

    from megatron_amir.rollout.router import free_port
    from megatron_amir.rollout.weight_sync import TensorBroadcaster

    port = free_port("127.0.0.1")
    got, errors = {}, []

    def worker():
        try:
            comm = TensorBroadcaster.gloo("127.0.0.1", port, 1, 2, timeout_s=30)
            t = torch.zeros(3)
            comm.broadcast(t)
            got["t"] = t
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    th = threading.Thread(target=worker)
    th.start()
    master = TensorBroadcaster.gloo("127.0.0.1", port, 0, 2, timeout_s=30)
    master.broadcast(torch.tensor([1.0, 2.0, 3.0]))
    th.join(30)
    assert not errors and torch.equal(got["t"], torch.tensor([1.0, 2.0, 3.0]))
    # the store owns the listening descriptor: no Python socket object left to close it a second time
    assert not any(type(v).__name__ == "socket" for v in vars(master).values())
    with open("/proc/net/tcp") as f:  # local_address is hex IP:port; 0100007F = 127.0.0.1, state 0A = LISTEN
        listening = [ln.split()[1] for ln in f.read().splitlines()[1:] if ln.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening
    assert f"00000000:{port:04X}" not in listening
    try:
        with open("/proc/net/tcp6") as f:
            listening6 = [ln.split()[1] for ln in f.read().splitlines()[1:] if ln.split()[3] == "0A"]
    except FileNotFoundError:
        listening6 = []
    assert f"00000000000000000000000000000000:{port:04X}" not in listening6
