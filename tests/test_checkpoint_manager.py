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


def test_resume_from_an_older_step_abandons_the_newer_ones(tmp_path):
    """After checkpoint.resume=<step 20> in a directory holding steps 30 and 40, saving step 25 keeps step 25
    (it is the newest now) and removes 30 and 40, which would otherwise win the next automatic resume."""
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        mgr.save(step, _writer(bytes([step]) * 10), {"step": step})
    mgr.save(25, _writer(b"x" * 10), {"step": 25})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000025"]
    assert mgr.latest_good().name == "step_00000025"
    mgr.save(25, _writer(b"y" * 10), {"step": 25})  # re-saving a step replaces it
    assert (mgr.latest_good() / "model" / "weights.bin").read_bytes() == b"y" * 10
    assert not list(tmp_path.glob(".old-*")) and not list(tmp_path.glob(".tmp-*"))


def test_published_files_are_readable_by_others(tmp_path):
    """Checkpoints and atomically written files get the umask's mode, not tempfile's private 0600 / 0700."""
    from megatron_amir.fileio import atomic_write_text, publish_mode

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
        d = tmp_path / "d"
        d.mkdir(mode=0o700)
        publish_mode(d, directory=True)
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        mgr = CheckpointManager(tmp_path / "ck", keep_last=1)
        mgr.save(1, _writer(b"z"), {"step": 1})
        assert stat.S_IMODE((tmp_path / "ck" / "latest").stat().st_mode) == 0o644
    finally:
        os.umask(old)
