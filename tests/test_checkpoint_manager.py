"""Trainer checkpoint directories: atomic, verified, keep-last-k, fallback past corrupt or partial ones."""

import json
import os
import stat

import pytest

from megatron_amir.training.checkpoint import CheckpointManager, verify_manifest


def _writer(payload: bytes):
    def write(d):
        (d / "model").mkdir()
        (d / "model" / "weights.bin").write_bytes(payload)
    return write


def test_save_prune_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, _writer(bytes([step]) * 100), {"step": step})
    dirs = sorted(p.name for p in tmp_path.glob("step_*"))
    assert dirs == ["step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    good = mgr.latest_good()
    assert good.name == "step_00000003" and mgr.read_meta(good)["step"] == 3
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, _writer(b"a" * 64), {"step": 1})
    mgr.save(2, _writer(b"b" * 64), {"step": 2})
    (tmp_path / "step_00000002" / "model" / "weights.bin").write_bytes(b"c" * 64)  # same size, other bytes
    assert "sha256" in verify_manifest(tmp_path / "step_00000002")
    with caplog.at_level("WARNING"):
        assert mgr.latest_good().name == "step_00000001"
    assert "skipping checkpoint" in caplog.text


def test_truncated_and_missing_manifest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, _writer(b"a" * 64), {"step": 1})
    mgr.save(2, _writer(b"b" * 64), {"step": 2})
    (tmp_path / "step_00000002" / "model" / "weights.bin").write_bytes(b"b" * 10)
    assert "size" in verify_manifest(tmp_path / "step_00000002")
    os.remove(tmp_path / "step_00000001" / "MANIFEST.json")
    assert mgr.latest_good() is None


def test_failed_write_keeps_previous_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, _writer(b"a" * 64), {"step": 1})

    def boom(d):
        (d / "partial.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, boom, {"step": 2})
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert mgr.latest_good().name == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir_keeps_previous(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, _writer(b"a" * 64), {"step": 1})
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OSError):
            mgr.save(2, _writer(b"b" * 64), {"step": 2})
    finally:
        tmp_path.chmod(stat.S_IRWXU)
    assert mgr.latest_good().name == "step_00000001"


def test_meta_roundtrip(tmp_path):
    mgr = CheckpointManager(tmp_path)
    ck = mgr.save(5, _writer(b"z"), {"step": 5, "lambda": 0.02, "cursor": {"epoch": 1, "pos": 3}})
    assert json.loads((ck / "meta.json").read_text())["cursor"] == {"epoch": 1, "pos": 3}
