"""Trainer checkpoints: atomic step directories with a manifest, a ``latest`` pointer, keep-last-k.

Layout under ``checkpoint.dir``::

    step_00000020/            one complete checkpoint
        model/ ...            written by the policy (Megatron dist checkpoint, optimizer, scheduler)
        trainer_state.pt      RNG states of every rank, loaded with torch.load(weights_only=True)
        meta.json             step, weight version, lambda state, data cursor, non-finite count, resolved config, ...
        MANIFEST.json         size (and sha256 for files <= HASH_LIMIT) of every file above
    latest                    text file naming the newest complete step directory, replaced last
    reference/                the run's starting weights (a model-only policy checkpoint), saved once at a fresh
                              start when the reference policy is needed (KL, reference-anchored pairs) and no
                              --init-from checkpoint holds them; every meta.json records where the reference lives

A save goes to ``.tmp-step_XXXXXXXX`` first, is fsynced, then renamed; ``latest`` is replaced only after the
rename. Saving step N removes any step after N: those belong to a run that was resumed from an older
checkpoint (left in place they would win the next automatic resume). A crash at any point leaves the previous checkpoint as ``latest``. On load the manifest is verified and
a corrupt or partial checkpoint is skipped (with a warning) in favour of the newest older good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_amir.fileio import atomic_write_text, fsync_path

log = logging.getLogger(__name__)

HASH_LIMIT = 256 * 1024 * 1024  # hashing 100s of GB would dominate save time; sizes are always checked
MANIFEST = "MANIFEST.json"
LATEST = "latest"
REFERENCE_DIR = "reference"  # relative to the checkpoint root; never pruned
WARMUP_KIND = "sft-warmup"  # meta.json "kind" of a supervised warm-up checkpoint (RL checkpoints have none)


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(root: Path) -> dict[str, Any]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            size = p.stat().st_size
            files[rel] = {"size": size, "sha256": _sha256(p) if size <= HASH_LIMIT else None}
    return {"format": 1, "files": files}


def verify_manifest(root: Path) -> Optional[str]:
    """Return None if ``root`` matches its manifest, else a one-line reason."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        return f"{mpath} is missing (partial checkpoint)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        # a hand-edited or bit-flipped manifest must read as "corrupt", not crash the fallback search
        if not isinstance(files, dict) or not all(
            isinstance(i, dict) and isinstance(i.get("size"), int) for i in files.values()
        ):
            raise ValueError("'files' must map each path to {size, sha256}")
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        return f"{mpath} is unreadable: {exc}"
    for rel, info in files.items():
        p = root / rel
        if not p.is_file():
            return f"{p} listed in the manifest is missing"
        if p.stat().st_size != info["size"]:
            return f"{p} has size {p.stat().st_size}, manifest says {info['size']}"
        if info.get("sha256") and _sha256(p) != info["sha256"]:
            return f"{p} does not match its sha256 in the manifest"
    return None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Saves and finds trainer checkpoints. Collective-safe: every rank calls ``save``; rank 0 finalizes."""

    def __init__(self, root: str | Path, keep_last: int = 3, rank: int = 0, barrier: Callable[[], None] = lambda: None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    # ------------------------------------------------------------------ save
    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any]) -> Path:
        """Write checkpoint ``step``: ``write(tmp_dir)`` fills it on every rank; rank 0 adds meta + manifest."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        written = False
        try:
            write(tmp)
            written = True
        finally:
            self.barrier()
            if not written and self.rank == 0:  # a failed save leaves nothing half-written behind
                shutil.rmtree(tmp, ignore_errors=True)
        if self.rank == 0:
            try:
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
                (tmp / MANIFEST).write_text(json.dumps(build_manifest(tmp), indent=1))
                for p in tmp.rglob("*"):
                    if p.is_file():
                        fsync_path(p)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            old = None
            if final.exists():  # re-saving the same step (e.g. after a resume): move the old copy aside first,
                old = self.root / f".old-{final.name}-{os.getpid()}"  # so a crash never leaves the step missing
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_path(self.root)
            atomic_write_text(self.root / LATEST, final.name + "\n")
            fsync_path(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune(step)
        self.barrier()
        return final

    def _prune(self, current: int) -> None:
        """Delete steps after ``current`` (a run resumed from an older checkpoint abandons them: left in place,
        they would outrank the new ones), then all but the newest ``keep_last`` (``current`` is the newest)."""
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        newer = [p for p in steps if p.name > step_dir_name(current)]
        steps = [p for p in steps if p.name <= step_dir_name(current)]
        for old in newer + steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def latest_good(self) -> Optional[Path]:
        """The newest checkpoint whose manifest verifies; a bad ``latest`` falls back with a warning."""
        if not self.root.is_dir():
            return None
        named = None
        pointer = self.root / LATEST
        if pointer.is_file():  # garbage in the pointer (a torn write, binary junk) only loses its preference
            named = self.root / pointer.read_bytes().decode("utf-8", "replace").strip()
        candidates = sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True)
        if named is not None and named in candidates:  # the pointer wins over newer unpointed dirs
            candidates.remove(named)
            candidates.insert(0, named)
        for cand in candidates:
            problem = verify_manifest(cand)
            if problem is None:
                return cand
            log.warning("skipping checkpoint %s: %s", cand, problem)
        return None

    @staticmethod
    def read_meta(ckpt: Path) -> dict[str, Any]:
        try:
            return json.loads((ckpt / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {ckpt / 'meta.json'}: {exc}") from None
