"""Versioned weight sync from the trainer to the rollout engines.

(a) File path (CPU and GPU, any number of servers): the trainer writes its HF-named tensors as
    safetensors shards plus ``manifest.json`` (version, sha256 and size of every file, the HF config)
    into ``<root>/v<version>/``; the directory appears atomically (written under a temp name, then
    renamed) and ``<root>/LATEST`` names the newest one. Servers read the shards, check every sha256
    against the exact bytes they deserialize, and only then load them (``read_snapshot``).
    Shards (64 MiB by default) are hashed on a few threads beside the write (writer) and beside the
    copy into memory (reader), so a verified sync costs little more than a raw safetensors write + read
    when cores are free; the hash work itself (about 2 GB/s per core with SHA-NI) is the floor otherwise. No fsync: the rename
    makes a snapshot visible only when complete, which is what readers on the same host or a shared
    file system need; durability across power loss is the checkpoint's job, not the sync's.
(b) Collective path: the trainer streams its weights bucket by bucket (``training.weight_stream``) and broadcasts
    each bucket (one flat buffer) into one group per rollout server (``TensorBroadcaster``: gloo on CPU, NCCL on
    GPU, the same code), announced first with the whole layout (vLLM's update_info lists names, dtype_names,
    shapes, plus offsets and buckets); the server (our embedded one, or vLLM's workers through the
    ``vllm_worker`` extension) rebuilds each bucket's views and loads them before the next bucket arrives
    (``receive_buckets``). One group per server: a server that dies mid-broadcast fails its own group only
    (``send_buckets``). ``update_info`` / ``send_tensors`` / ``receive_tensors`` are the older per-tensor form
    over one group (``init_weight_transfer_engine`` with backend "gloo" on the embedded server).

Name mapping Megatron -> HF is not here: callers pass HF-named tensors (megatron_amir.convert.mapping owns the map).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch

from megatron_amir.fileio import atomic_write_text

MANIFEST = "manifest.json"
LATEST = "LATEST"
FORMAT = "megatron-amir-weights"
FORMAT_VERSION = 1
_SNAP_RE = re.compile(r"^v(\d+)$")

# safetensors dtype codes (https://github.com/huggingface/safetensors, format spec)
_DTYPE_CODE = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPE_CODE[torch.float8_e4m3fn] = "F8_E4M3"
    _DTYPE_CODE[torch.float8_e5m2] = "F8_E5M2"


class WeightSyncError(RuntimeError):
    """A snapshot that is missing, incomplete or corrupted; the message names the file."""


@dataclass
class Snapshot:
    path: Path
    version: int
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]


def snapshot_dir(root: Union[str, Path], version: int) -> Path:
    return Path(root) / f"v{int(version):08d}"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _safetensors_header(tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    """8-byte little-endian size N + N bytes of JSON (space-padded to a multiple of 8) mapping name ->
    {dtype, shape, data_offsets [begin, end)} relative to the data section, which holds the tensors'
    bytes back to back (the safetensors format)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_CODE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    return struct.pack("<Q", len(hjson)) + hjson


def _sha256_chunks(chunks: list) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)  # releases the GIL for large buffers
    return h.hexdigest()


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str],
                       hasher: ThreadPoolExecutor) -> Future:
    """Write ``tensors`` as a safetensors file; returns a Future of the sha256 of the file's bytes.

    The digest is computed by ``hasher`` from the same in-memory buffers that are written (header, then
    each tensor's bytes), so it runs beside the write, and beside the other shards' hashes, without
    reading the file back.
    """
    chunks = [_safetensors_header(tensors, metadata)] + [_tensor_bytes(t) for _, t in tensors]
    digest = hasher.submit(_sha256_chunks, chunks)
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
    return digest


def _sha256_file(path: Path) -> str:
    """sha256 of a file through a read-only memory map (no copy into Python objects)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            step = 64 * 1024 * 1024
            for s in range(0, len(mm), step):
                h.update(memoryview(mm)[s : s + step])
    return h.hexdigest()


def write_snapshot(
    named_tensors: Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]],
    root: Union[str, Path],
    version: int,
    hf_config: Optional[Mapping[str, Any]] = None,
    max_shard_bytes: int = 64 * 1024**2,
    keep_last: Optional[int] = 2,
    hash_threads: Optional[int] = None,
) -> Path:
    """Write a versioned snapshot ``<root>/v<version>`` atomically and point ``<root>/LATEST`` at it.

    Shards of at most ``max_shard_bytes`` (one tensor larger than that gets a shard of its own) are
    hashed in parallel on ``hash_threads`` threads (default: min(4, CPUs)) while they are written; small
    shards keep the hashing parallel on the reader's side too.

    ``keep_last``: delete older snapshots beyond this many (None keeps all). Re-writing an existing
    version replaces it (a retried sync after a trainer restart). Snapshots with a HIGHER version are
    deleted: the trainer's versions only grow, so they were written by a run that crashed after its last
    checkpoint and was resumed from it (its version counts again from the checkpoint's).
    """
    items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    if not items:
        raise ValueError("write_snapshot: no tensors given")
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nb
    return _write_shards(shards, root, version, hf_config, keep_last, hash_threads or _default_hash_threads(),
                         max_pending=None)


def write_snapshot_stream(buckets: Iterable[Any], root: Union[str, Path], version: int,
                          hf_config: Optional[Mapping[str, Any]] = None, keep_last: Optional[int] = 2) -> Path:
    """``write_snapshot`` from a stream of buckets (``training.weight_stream.Bucket``s, or lists of (name, tensor)):
    each bucket becomes one shard, hashed beside its own write, and is let go before the next one is asked for,
    so the writer holds one bucket at a time."""
    shards = (list(b.tensors) if hasattr(b, "tensors") else list(b) for b in buckets)
    return _write_shards(shards, root, version, hf_config, keep_last, hash_threads=1, max_pending=0)


def _write_shards(shards: Iterable[list[tuple[str, torch.Tensor]]], root: Union[str, Path], version: int,
                  hf_config: Optional[Mapping[str, Any]], keep_last: Optional[int], hash_threads: int,
                  max_pending: Optional[int]) -> Path:
    """Write each shard as a safetensors file into a temp dir beside the target, then manifest, rename, LATEST.
    ``max_pending``: how many shards' digests may still be running (each one holds its shard's tensors) before the
    next shard is taken; None: no limit (the caller holds every tensor anyway)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = snapshot_dir(root, version)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        files: dict[str, dict] = {}
        seen: set[str] = set()
        with ThreadPoolExecutor(max_workers=hash_threads) as hasher:
            pending: list[tuple[str, Future]] = []
            for i, shard in enumerate(shards):
                names = [n for n, _ in shard]
                if seen.intersection(names) or len(set(names)) != len(names):
                    raise ValueError("write_snapshot: duplicate tensor names")
                seen.update(names)
                part = f"part-{i:05d}"
                pending.append((part, _write_safetensors(tmp / part, shard, {"format": "pt",
                                                                             "weight_version": str(int(version))},
                                                         hasher)))
                files[part] = {"sha256": None, "bytes": (tmp / part).stat().st_size, "tensors": names}
                del shard
                while max_pending is not None and len(pending) > max_pending:
                    name, fut = pending.pop(0)
                    files[name]["sha256"] = fut.result()
            for name, fut in pending:
                files[name]["sha256"] = fut.result()
        if not seen:
            raise ValueError("write_snapshot: no tensors given")
        named = {}
        for i, part in enumerate(files):
            fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            os.replace(tmp / part, tmp / fname)
            named[fname] = files[part]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": int(version),
            "created": time.time(),
            "num_tensors": len(seen),
            "files": named,
            "hf_config": dict(hf_config) if hf_config is not None else None,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    prune_snapshots(root, keep_last, current=int(version))
    return final


def _default_hash_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def list_snapshots(root: Union[str, Path]) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _SNAP_RE.match(p.name))]
    return sorted(out)


def prune_snapshots(root: Union[str, Path], keep_last: Optional[int], current: Optional[int] = None) -> None:
    """Delete snapshots newer than ``current`` (an abandoned run's), then all but the newest ``keep_last``
    (None: keep all; the ``current`` snapshot itself is always kept)."""
    snaps = list_snapshots(root)
    if current is not None:
        for v, p in snaps:
            if v > current:
                shutil.rmtree(p, ignore_errors=True)
        snaps = [(v, p) for v, p in snaps if v <= current]
    if keep_last is not None:
        for _, p in snaps[: max(0, len(snaps) - max(1, keep_last))]:
            shutil.rmtree(p, ignore_errors=True)


def latest_snapshot(root: Union[str, Path]) -> Optional[Path]:
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    p = Path(root) / f.read_text().strip()
    return p if p.is_dir() else None


def _no_link(fp: Path) -> None:
    """Snapshot files are plain files written by write_snapshot: a symlink could point outside the directory a
    server was allowed to read (its --weights-root check covers the directory, not what its entries point to)."""
    if fp.is_symlink():
        raise WeightSyncError(f"{fp}: is a symbolic link; snapshot files must be regular files")


def read_manifest(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise WeightSyncError(f"{mf}: manifest not found (not a weight snapshot, or still being written)")
    _no_link(mf)
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as exc:
        raise WeightSyncError(f"{mf}: invalid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WeightSyncError(f"{mf}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise WeightSyncError(f"{mf}: format_version {manifest.get('format_version')} != {FORMAT_VERSION}")
    if not isinstance(manifest.get("version"), int) or not isinstance(manifest.get("files"), dict):
        raise WeightSyncError(f"{mf}: needs an integer 'version' and a 'files' mapping")
    return manifest


def read_snapshot(path: Union[str, Path], verify: bool = True, expected_version: Optional[int] = None,
                  hash_threads: Optional[int] = None) -> Snapshot:
    """Read and verify a snapshot directory; returns its tensors (CPU, in memory) and manifest.

    safetensors parses each file (memory-mapped) and its tensors are copied into memory while
    ``hash_threads`` threads compute the files' sha256; any mismatch with the manifest raises before
    anything is returned. Snapshots are immutable once renamed into place, so hashing the file and
    loading it see the same bytes (the hash guards against torn, partial or corrupted files).
    """
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if expected_version is not None and manifest["version"] != int(expected_version):
        raise WeightSyncError(f"{path}: manifest version {manifest['version']} != expected {expected_version}")
    entries = []
    for fname, info in manifest["files"].items():
        if "/" in fname or "\\" in fname or fname.startswith(".") or not isinstance(info, dict):
            raise WeightSyncError(f"{path / MANIFEST}: bad file entry {fname!r}")
        fp = path / fname
        if not fp.is_file():
            raise WeightSyncError(f"{fp}: listed in the manifest but missing")
        _no_link(fp)
        size = fp.stat().st_size
        if size != info.get("bytes"):
            raise WeightSyncError(f"{fp}: size {size} != manifest {info.get('bytes')}")
        entries.append((fp, info))
    tensors: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max_workers=hash_threads or _default_hash_threads()) as hasher:
        digests = [hasher.submit(_sha256_file, fp) if verify else None for fp, _ in entries]
        for (fp, info), digest in zip(entries, digests):
            try:
                part = {k: v.clone() for k, v in load_file(str(fp)).items()}
            except Exception as exc:
                raise WeightSyncError(f"{fp}: cannot parse safetensors ({exc})") from None
            dup = tensors.keys() & part.keys()
            if dup:
                raise WeightSyncError(f"{fp}: tensors also in another shard: {sorted(dup)[:3]}")
            tensors.update(part)
        for (fp, info), digest in zip(entries, digests):
            if digest is not None and digest.result() != info.get("sha256"):
                sha = digest.result()
                raise WeightSyncError(
                    f"{fp}: sha256 mismatch (file {sha[:12]}..., manifest {str(info.get('sha256'))[:12]}...)")
    if len(tensors) != manifest.get("num_tensors", len(tensors)):
        raise WeightSyncError(f"{path}: {len(tensors)} tensors, manifest says {manifest.get('num_tensors')}")
    return Snapshot(path=path, version=manifest["version"], tensors=tensors, manifest=manifest)


# ------------------------------------------------------------------------------------------- collective path
class TensorBroadcaster:
    """A broadcast group between the trainer (rank 0, the sender) and rollout workers, outside the
    trainer's own torch.distributed world (its own TCPStore rendezvous, no init_process_group).

    ``gloo`` runs on CPU (tests, CPU fleets); on GPUs the vLLM workers use vLLM's PyNccl communicator
    with the same metadata and order (``vllm_worker.WeightSyncWorkerExtension``). The message format is
    vLLM's NCCL update_info: parallel lists ``names``, ``dtype_names``, ``shapes``; tensors follow in
    that order, each broadcast from rank 0.
    """

    def __init__(self, pg, rank: int, world_size: int, store):
        self.pg, self.rank, self.world_size, self._store = pg, rank, world_size, store

    @classmethod
    def gloo(cls, host: str, port: int, rank: int, world_size: int, timeout_s: float = 120.0) -> "TensorBroadcaster":
        return cls.create("gloo", host, port, rank, world_size, timeout_s)

    @classmethod
    def create(cls, backend: str, host: str, port: int, rank: int, world_size: int, timeout_s: float = 120.0,
               device: Optional[torch.device] = None) -> "TensorBroadcaster":
        """A ``backend`` ("gloo": CPU tensors; "nccl": CUDA tensors on ``device``) group of ``world_size`` ranks.
        Rank 0 hosts the rendezvous store, listening on ``host`` only (TCPStore alone listens on every interface);
        the other ranks connect to ``host:port``. ``timeout_s`` bounds the rendezvous and every collective, so a
        peer that dies mid-broadcast fails this group's next operation instead of hanging it."""
        import datetime

        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight broadcast backend must be gloo or nccl, got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        if rank == 0:
            sock = _listen_socket(host, port)
            try:
                store = dist.TCPStore(host, port, world_size, True, timeout=timeout, master_listen_fd=sock.fileno())
            except BaseException:
                sock.close()
                raise
            sock.detach()  # the store owns the descriptor now and closes it (closing it here too could hit a reuse)
        else:
            store = dist.TCPStore(host, port, world_size, False, timeout=timeout)
        store = dist.PrefixStore(f"wsync-{backend}", store)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            if device is not None:
                torch.cuda.set_device(device)
            pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        comm = cls(pg, rank, world_size, store)
        comm.backend = backend
        return comm

    def broadcast_async(self, t: torch.Tensor):
        """Start broadcasting ``t`` from rank 0; returns the work (``.wait()`` raises if a peer failed)."""
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.pg.broadcast([t], opts)

    def broadcast(self, t: torch.Tensor) -> None:
        self.broadcast_async(t).wait()


def _listen_socket(host: str, port: int):
    """A listening TCP socket bound to ``host:port`` (the address the workers are told), for the store."""
    import socket

    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise WeightSyncError(f"cannot listen on {host}:{port} for the weight broadcast rendezvous: {exc}") from exc
    return sock


def update_info(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """vLLM's update_info for a broadcast: {"names", "dtype_names", "shapes"} in sending order."""
    items = list(named_tensors)
    return {"names": [n for n, _ in items], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in items],
            "shapes": [list(t.shape) for _, t in items]}


def send_tensors(comm: TensorBroadcaster, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    for _, t in named_tensors:
        comm.broadcast(t.detach().contiguous())


def receive_tensors(comm: TensorBroadcaster, info: Mapping[str, Any], device="cpu") -> dict[str, torch.Tensor]:
    """Receive the tensors ``info`` (update_info) announces, in order; validates the metadata first."""
    names, dtypes, shapes = info.get("names"), info.get("dtype_names"), info.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not (
            len(names) == len(dtypes) == len(shapes)):
        raise ValueError("update_info needs parallel lists names, dtype_names, shapes")
    out = {}
    for name, dn, shape in zip(names, dtypes, shapes):
        dtype = getattr(torch, str(dn), None)
        if not isinstance(dtype, torch.dtype) or dtype not in _DTYPE_CODE:
            raise ValueError(f"update_info: tensor {name!r} has unsupported dtype {dn!r}")
        if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
            raise ValueError(f"update_info: tensor {name!r} has a bad shape {shape!r}")
        t = torch.empty(shape, dtype=dtype, device=device)
        comm.broadcast(t)
        out[str(name)] = t
    return out


# ------------------------------------------------------------------------------------ bucketed broadcast
# The receiving side of training.weight_stream (which fills the buckets on the trainer): a bucket is one flat uint8
# buffer, each tensor a view at a byte offset, so one broadcast moves a whole bucket and the receiver builds the
# views without a copy.
def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def view_in(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape`` over ``buffer`` (flat uint8) starting at byte ``offset``."""
    n = 1
    for s in shape:
        n *= s
    nbytes = n * itemsize(dtype)
    return buffer[offset:offset + nbytes].view(dtype).view(tuple(shape))


def bucket_tensors(buffer: torch.Tensor, entries: Sequence[tuple[str, torch.dtype, Sequence[int], int]]
                   ) -> list[tuple[str, torch.Tensor]]:
    """(name, view) for each (name, dtype, shape, offset) entry of a received bucket."""
    return [(name, view_in(buffer, off, dt, shape)) for name, dt, shape, off in entries]


def received_buckets(info: dict, receive: Callable[[torch.Tensor], Any], device="cpu"
                     ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receiving side of ``WeightStream.update_info``: for each announced bucket, a fresh flat buffer is filled by
    ``receive(buffer)`` (e.g. a broadcast from the sender) and its (name, view) pairs are yielded. Validates the
    announcement first (the message names the field)."""
    names, dtypes, shapes = info.get("names"), info.get("dtype_names"), info.get("shapes")
    offsets, buckets = info.get("offsets"), info.get("buckets")
    lists = (names, dtypes, shapes, offsets)
    if not all(isinstance(x, list) for x in (*lists, buckets)) or len({len(x) for x in lists}) != 1:
        raise ValueError("update_info needs parallel lists names, dtype_names, shapes, offsets and a list buckets")
    entries = []
    for name, dn, shape, off in zip(names, dtypes, shapes, offsets):
        dtype = getattr(torch, str(dn), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"update_info: tensor {name!r} has unsupported dtype {dn!r}")
        if not (isinstance(shape, list) and all(isinstance(x, int) and x >= 0 for x in shape)):
            raise ValueError(f"update_info: tensor {name!r} has a bad shape {shape!r}")
        if not isinstance(off, int) or off < 0:
            raise ValueError(f"update_info: tensor {name!r} has a bad offset {off!r}")
        entries.append((str(name), dtype, tuple(shape), off))
    if not all(isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x >= 0 for x in b) for b in buckets) \
            or sum(b[1] for b in buckets) != len(entries):
        raise ValueError("update_info.buckets must be [[bytes, number of tensors], ...] covering every tensor")
    parts, start = [], 0
    for nbytes, count in buckets:
        part = entries[start:start + count]
        start += count
        for name, dtype, shape, off in part:
            n = 1
            for x in shape:
                n *= x
            if off + n * itemsize(dtype) > nbytes:
                raise ValueError(f"update_info: tensor {name!r} ends beyond its bucket ({nbytes} bytes)")
        parts.append((nbytes, part))
    # ``receive`` may return a handle with wait() (an asynchronous broadcast): the next bucket is then already on
    # its way while the consumer loads this one (two buckets held at most)
    pending = None
    for nbytes, part in parts:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        handle = receive(buf)
        if pending is not None:
            yield _ready(*pending)
        pending = (handle, buf, part)
        del buf, handle
    if pending is not None:
        yield _ready(*pending)


def _ready(handle, buf: torch.Tensor, part) -> list[tuple[str, torch.Tensor]]:
    if handle is not None and hasattr(handle, "wait"):
        handle.wait()
    return bucket_tensors(buf, part)


def receive_buckets(comm: "TensorBroadcaster", info: Mapping[str, Any], device="cpu"
                    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``received_buckets`` filled by broadcasts from rank 0 of ``comm`` (the next one in flight while the consumer
    loads the current one)."""
    return received_buckets(info, comm.broadcast_async, device)


def send_buckets(members: Mapping[str, "TensorBroadcaster"], buckets: Iterable[Any]) -> dict[str, str]:
    """Broadcast every bucket's buffer (``Bucket.buffer``, or a flat tensor) into each member's own group, all
    members at once; returns {member: error} for those whose broadcast failed (a dead peer, a timeout). A failed
    member is left out for the rest of the stream, the others go on, and the stream is always consumed to its end
    (on the trainer it is collective: every rank takes part in filling each bucket).

    Each bucket's memory is given back (storage resized to 0) once it was sent: a bucket is spent after its
    broadcast.
    """
    live = dict(members)
    errors: dict[str, str] = {}
    for bucket in buckets:
        errors.update(_send_bucket(live, bucket.buffer if hasattr(bucket, "buffer") else bucket))
        del bucket  # nothing here may keep the bucket alive while the stream fills the next one
        for name in errors:
            live.pop(name, None)
    return errors


def _send_bucket(live: Mapping[str, "TensorBroadcaster"], buf: torch.Tensor) -> dict[str, str]:
    """One bucket into every live member's group at once; {member: error} for those that failed."""
    host = buf if buf.device.type == "cpu" else None  # gloo moves CPU tensors: one copy per bucket, shared
    works, errors = {}, {}
    for name, comm in live.items():
        try:
            if comm.backend == "gloo" and host is None:
                host = buf.cpu()
            works[name] = comm.broadcast_async(buf if comm.backend == "nccl" else host)
        except Exception as exc:  # noqa: BLE001 - one member's failure is reported, not raised
            errors[name] = f"{type(exc).__name__}: {exc}"
    for name, work in works.items():
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001
            errors[name] = f"{type(exc).__name__}: {exc}"
    # the bucket is spent once every member has it, but gloo keeps a reference to the last tensor it broadcast,
    # which would hold this bucket's memory while the stream fills the next one: give the storage back now
    for t in {id(x): x for x in (buf, host) if x is not None}.values():
        t.untyped_storage().resize_(0)
    return errors


class Bucket:
    """One bucket of a weight update: a flat uint8 ``buffer`` and the (HF name, view) pairs over it."""

    def __init__(self, buffer: torch.Tensor, tensors: list[tuple[str, torch.Tensor]]):
        self.buffer, self.tensors = buffer, tensors

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def release(self) -> None:
        """Drop the buffer and views (tensors a consumer kept from ``tensors`` keep their storage alive)."""
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.tensors = []


ALIGN = 64  # byte alignment of every tensor inside a bucket (any dtype's element size divides it)


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class PackedBuckets:
    """Tensors already in memory (e.g. the weights a trainer starts with) as a bucketed update: the same
    ``update_info`` and ``Bucket`` stream as ``training.weight_stream.WeightStream``, each bucket packed (one copy of
    its tensors) when it is reached."""

    def __init__(self, named_tensors: Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]],
                 bucket_bytes: int = 256 * 1024**2):
        self.items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        self.layouts: list[list[tuple[int, int]]] = []  # per bucket: (item index, byte offset)
        self.sizes: list[int] = []
        cur, size = [], 0
        for i, (_, t) in enumerate(self.items):
            nb = t.numel() * t.element_size()
            if cur and align(size) + nb > bucket_bytes:
                self.layouts.append(cur)
                self.sizes.append(size)
                cur, size = [], 0
            off = align(size)
            cur.append((i, off))
            size = off + nb
        if cur:
            self.layouts.append(cur)
            self.sizes.append(size)

    def update_info(self) -> dict:
        names, dtypes, shapes, offsets = [], [], [], []
        for lay in self.layouts:
            for i, off in lay:
                name, t = self.items[i]
                names.append(name)
                dtypes.append(str(t.dtype).removeprefix("torch."))
                shapes.append(list(t.shape))
                offsets.append(off)
        return {"names": names, "dtype_names": dtypes, "shapes": shapes, "offsets": offsets,
                "buckets": [[n, len(lay)] for n, lay in zip(self.sizes, self.layouts)]}

    def __iter__(self) -> Iterator[Bucket]:
        for lay, nbytes in zip(self.layouts, self.sizes):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.items[lay[0][0]][1].device)
            views = []
            for i, off in lay:
                name, t = self.items[i]
                v = view_in(buf, off, t.dtype, t.shape)
                v.copy_(t.detach())
                views.append((name, v))
            bucket = Bucket(buf, views)
            del views, buf
            yield bucket
            bucket.release()

    def drain(self) -> None:
        pass
