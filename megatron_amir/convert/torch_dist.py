"""Write a Megatron-Core ``torch_dist`` checkpoint directory directly: one process, bytes copied file to file.

What ``dist_checkpointing.save`` writes for a TP=PP=1 model, and so what ``dist_checkpointing.load`` reads at
any TP/PP: a PyTorch Distributed Checkpoint (DCP) directory with

- ``__0_<i>.distcp``: the items one after another, each a ``torch.save`` archive (a tensor chunk, or for a
  ``ShardedObject`` the bytes of ``torch.save([obj])``, as Megatron packs them); tensors are spread over two
  files written by two threads, as DCP's writer does;
- ``.metadata``: pickled ``torch.distributed.checkpoint.metadata.Metadata`` (global shape, dtype and chunks of
  every tensor, byte range of every item);
- ``metadata.json``: Megatron's backend tag (``torch_dist``, version 1).

Which keys, chunks and objects there are comes from Megatron itself (``megatron_side.checkpoint_layout``);
this module only serializes. A tensor chunk's payload is given as *pieces*: byte ranges of open files
(``(fd, offset, nbytes)``, moved with ``os.copy_file_range``: a kernel-side copy, nothing mapped or held in this
process) or in-memory buffers. The archive around the payload is produced by ``torch.save`` itself, on a
never-touched placeholder tensor whose data write is replaced by the pieces, so the bytes are exactly
``torch.save``'s with CRC32 computation off (``torch.serialization.set_crc32_options(False)``; ``torch.load``
never verifies the CRC, DCP's reader included, so it protects nothing here).

Durability (``sync=True``): writeback of each data file is started as it grows (``sync_file_range``) and
everything is fsynced once at the end (data files, ``.metadata``, ``metadata.json``, the directory) -- the
guarantee of Megatron's writer, which fsyncs every file it writes. With ``sync=False`` nothing is forced to
disk (the page cache writes it back later), as ``safetensors`` / ``save_pretrained`` do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import math
import os
import pickle
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch

from megatron_amir.fileio import fsync_path

_SYNC_CHUNK = 32 << 20  # start writeback every this many bytes
_COPY_CHUNK = 1 << 30

Piece = Union[tuple[int, int, int], memoryview, bytes]  # (fd, offset, nbytes) of a file, or bytes in memory


def _libc_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _size(piece: Piece) -> int:
    return piece[2] if isinstance(piece, tuple) else memoryview(piece).nbytes


def slice_pieces(pieces: Sequence[Piece], start: int, nbytes: int) -> list[Piece]:
    """The sub-list of ``pieces`` covering bytes [start, start + nbytes) of their concatenation."""
    out: list[Piece] = []
    pos = 0
    for p in pieces:
        lo, hi = max(start, pos), min(start + nbytes, pos + _size(p))
        if lo < hi:
            if isinstance(p, tuple):
                out.append((p[0], p[1] + lo - pos, hi - lo))
            else:
                out.append(memoryview(p).cast("B")[lo - pos:hi - pos])
        pos += _size(p)
    if sum(map(_size, out)) != nbytes:
        raise ValueError(f"pieces hold {pos} bytes, asked for [{start}, {start + nbytes})")
    return out


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data):]


def _copy_range(src: int, src_offset: int, dst: int, nbytes: int) -> None:
    """``nbytes`` of ``src`` at ``src_offset`` appended at ``dst``'s position, in the kernel where possible."""
    while nbytes:
        try:
            n = os.copy_file_range(src, dst, min(nbytes, _COPY_CHUNK), src_offset)
        except OSError:  # e.g. EXDEV / ENOSYS / EOPNOTSUPP: plain read + write
            n = len(chunk := os.pread(src, min(nbytes, 64 << 20), src_offset))
            _write_all(dst, memoryview(chunk))
        if n == 0:
            raise OSError(f"source file ends before offset {src_offset + nbytes} (truncated?)")
        src_offset += n
        nbytes -= n


class _ArchiveSink:
    """File-like given to ``torch.save``: archive bytes go to ``fd``; the placeholder's data, to the pieces."""

    def __init__(self, fd: int, placeholder: torch.Tensor, pieces: Sequence[Piece]):
        self.fd, self.pieces = fd, pieces
        self.lo = placeholder.data_ptr()
        self.hi = self.lo + placeholder.untyped_storage().nbytes()
        self.payload_bytes = 0

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        addr = _address(mv) if mv.nbytes else 0
        if self.lo <= addr and addr + mv.nbytes <= self.hi and mv.nbytes:
            for p in slice_pieces(self.pieces, addr - self.lo, mv.nbytes):
                if isinstance(p, tuple):
                    _copy_range(p[0], p[1], self.fd, p[2])
                else:
                    _write_all(self.fd, p)
            self.payload_bytes += mv.nbytes
        else:
            _write_all(self.fd, mv)
        return mv.nbytes

    def flush(self) -> None:
        pass


def _crc32(enabled: bool) -> bool:
    """Turn torch.save's CRC32 computation on/off; returns the previous setting. torch < 2.6 has no switch:
    its archives then carry the CRC of the untouched placeholder, not of the copied payload -- harmless, as
    nothing reads it (``torch.load`` and DCP's reader never verify), only slower."""
    try:
        from torch.serialization import get_crc32_options, set_crc32_options
    except ImportError:
        return True
    previous = get_crc32_options()
    set_crc32_options(enabled)
    return previous


def _address(mv: memoryview) -> int:
    import numpy as np

    return np.frombuffer(mv, dtype=np.uint8).ctypes.data


@dataclass
class _Tensor:
    """Chunks of one global tensor whose bytes share one source (e.g. a parameter and its swiglu halves)."""

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[tuple[tuple[int, ...], tuple[int, ...], int]]  # (offsets, sizes, first byte in the source)
    pieces: Callable[[], Sequence[Piece]]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(sizes) for _, sizes, _ in self.chunks) * self.dtype.itemsize


class _DataFile:
    """One ``__0_<i>.distcp`` file, written by one thread."""

    def __init__(self, path: Path, sync: bool):
        self.name = path.name
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.sync, self._synced = sync, 0
        self.results: list[tuple[Any, Any]] = []  # (MetadataIndex, _StorageInfo)

    def _item(self, index, write: Callable[[], None]) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        start = os.lseek(self.fd, 0, os.SEEK_CUR)
        write()
        end = os.lseek(self.fd, 0, os.SEEK_CUR)
        self.results.append((index, _StorageInfo(self.name, start, end - start)))
        if self.sync and _sync_file_range is not None and end - self._synced >= _SYNC_CHUNK:
            _sync_file_range(self.fd, self._synced, end - self._synced, _SYNC_FILE_RANGE_WRITE)  # start writeback
            self._synced = end

    def write_tensor(self, t: _Tensor) -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        pieces = t.pieces()
        for offsets, sizes, first in t.chunks:
            placeholder = torch.empty(sizes, dtype=t.dtype)  # never written or read: its pages stay unallocated
            nbytes = placeholder.untyped_storage().nbytes()
            sink = _ArchiveSink(self.fd, placeholder, slice_pieces(pieces, first, nbytes))
            self._item(MetadataIndex(t.key, torch.Size(offsets)), lambda: torch.save(placeholder, sink))
            if sink.payload_bytes != nbytes:
                raise RuntimeError(f"torch.save wrote {sink.payload_bytes} of {nbytes} payload bytes of '{t.key}'")

    def write_object(self, unique_key: str, data: bytes) -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        self._item(MetadataIndex(unique_key), lambda: _write_all(self.fd, memoryview(data)))

    def close(self) -> None:
        try:
            if self.sync:
                os.fdatasync(self.fd)
        finally:
            os.close(self.fd)


class TorchDistWriter:
    """One-rank writer of a torch_dist checkpoint directory (``path`` is created and must not exist).

    ``add_tensor`` / ``add_object`` record what to write; ``close`` writes it: tensors spread over ``threads``
    data files by size (as DCP's writer does), one thread each, then the metadata. ``sync``: fsync everything
    (writeback started while the files grow, so the final fsync mostly finds it done).
    """

    def __init__(self, path: Path, *, threads: int = 2, sync: bool = True):
        self.path = Path(path)
        self.path.mkdir()
        self.threads, self.sync = max(1, threads), sync
        self._tensors: list[_Tensor] = []
        self._objects: list[tuple[str, bytes]] = []

    def add_tensor(self, key: str, global_shape: Sequence[int], dtype: torch.dtype,
                   chunks: Sequence[tuple[Sequence[int], Sequence[int], int]],
                   pieces: Callable[[], Sequence[Piece]]) -> None:
        """Chunks (offsets, sizes, first byte) of global tensor ``key``; chunk bytes are the C-order bytes of
        ``pieces()`` (called once, when written) from its first byte on."""
        self._tensors.append(_Tensor(key, tuple(global_shape), dtype,
                                     [(tuple(o), tuple(s), b) for o, s, b in chunks], pieces))

    def add_object(self, unique_key: str, obj: Any) -> None:
        """A ``ShardedObject`` (by its ``unique_key``), serialized as Megatron does: ``torch.save([obj])``."""
        buf = io.BytesIO()
        torch.save([obj], buf)
        self._objects.append((unique_key, buf.getvalue()))

    def _metadata(self, files: list[_DataFile]):
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata, ChunkStorageMetadata, Metadata, StorageMeta, TensorProperties,
            TensorStorageMetadata,
        )

        state: dict[str, Any] = {}
        for t in self._tensors:
            md = state.setdefault(t.key, TensorStorageMetadata(TensorProperties(dtype=t.dtype),
                                                               torch.Size(t.global_shape), []))
            if md.properties.dtype != t.dtype or tuple(md.size) != t.global_shape:
                raise ValueError(f"chunks of '{t.key}' disagree on dtype / global shape")
            md.chunks += [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s, _ in t.chunks]
        for key, _ in self._objects:
            state[key] = BytesStorageMetadata()
        storage = dict(r for f in files for r in f.results)
        return Metadata(state_dict_metadata=state, storage_data=storage, version=CURRENT_DCP_VERSION,
                        storage_meta=StorageMeta(checkpoint_id=str(self.path), save_id=str(uuid.uuid4())))

    def close(self) -> None:
        """Write the data files (in parallel), then ``.metadata`` and Megatron's ``metadata.json``."""
        from megatron_amir.model.compat import apply_cpu_compat

        apply_cpu_compat()  # importing megatron.core needs the Triton stand-in where triton is absent
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

        buckets: list[list[_Tensor]] = [[] for _ in range(self.threads)]
        loads = [0] * self.threads
        for t in sorted(self._tensors, key=lambda t: -t.nbytes):  # largest first onto the lightest file
            i = loads.index(min(loads))
            buckets[i].append(t)
            loads[i] += t.nbytes
        files: list[_DataFile] = []
        workers: list[threading.Thread] = []
        errors: list[BaseException] = []
        stop = threading.Event()  # a failure anywhere stops the other writers at their next tensor

        def run(f: _DataFile, tensors: list[_Tensor]) -> None:
            try:
                for t in tensors:
                    if stop.is_set():
                        return
                    f.write_tensor(t)
            except BaseException as exc:  # re-raised by the caller
                errors.append(exc)
                stop.set()

        crc = _crc32(False)  # process-wide: set once around all threads
        try:
            for i in range(self.threads):
                files.append(_DataFile(self.path / f"__0_{i}.distcp", self.sync))
            for key, data in self._objects:
                files[0].write_object(key, data)
            workers = [threading.Thread(target=run, args=(f, b), daemon=True) for f, b in zip(files[1:], buckets[1:])]
            for w in workers:
                w.start()
            run(files[0], buckets[0])
        except BaseException:
            stop.set()
            raise
        finally:
            for w in workers:  # before any descriptor is closed (a reused number must not be written to)
                w.join()
            _crc32(crc)
            for f in files:
                f.close()
        if errors:
            raise errors[0]
        with open(self.path / ".metadata", "wb") as fh:
            pickle.dump(self._metadata(files), fh)
            if self.sync:
                fh.flush()
                os.fsync(fh.fileno())
        save_config(CheckpointingConfig("torch_dist", 1), str(self.path))
        if self.sync:
            for name in ("metadata.json", "."):
                fsync_path(self.path / name)
