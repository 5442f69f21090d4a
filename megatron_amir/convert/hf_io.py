"""Hugging Face checkpoint directories: streaming safetensors reading, sharded writing, side files.

Reading validates each file with safetensors' own reader (header, dtypes, offsets) and then hands out where
each tensor's bytes lie (``TensorRef``), so a converter can copy them file to file without holding them;
``read_tensor`` reads one into its own buffer where it must be transformed. Writing buffers tensors up to
``max_shard_bytes`` and writes a shard at a time; with more than one shard a ``model.safetensors.index.json``
is written, as ``save_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from megatron_amir.fileio import fsync_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# files copied next to the weights (tokenizers, generation defaults, chat template)
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class HFCheckpointError(ValueError):
    """A Hugging Face directory is incomplete or malformed; the message names the file."""


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{path} not found: not a Hugging Face model directory")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise HFCheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def list_shards(hf_dir: Path) -> list[Path]:
    """The safetensors files of a model, in index order; every listed shard must exist."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("'weight_map' must map tensor names to shard file names")
        except (ValueError, KeyError, TypeError) as exc:
            raise HFCheckpointError(f"{index} is malformed: {exc}") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise HFCheckpointError(f"missing shard(s) listed in {index}: {missing}")
        return [hf_dir / n for n in names]
    single = hf_dir / SINGLE_NAME
    if single.is_file():
        return [single]
    if list(hf_dir.glob("*.bin")):
        raise HFCheckpointError(f"{hf_dir} has only PyTorch .bin weights; convert them to safetensors first")
    raise HFCheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {hf_dir}")


def _offsets(path: Path) -> tuple[dict, int]:
    """Header of a safetensors file: {name: {"dtype", "shape", "data_offsets"}} and the data start."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie in an open safetensors file (dtype and shape as its header states)."""

    path: Path
    fd: int
    offset: int  # absolute file offset of the first byte
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """The tensor ``ref`` points to, ``pread`` into its own buffer (no mapping of the file stays behind)."""
    buf = torch.empty(ref.nbytes, dtype=torch.uint8)
    if ref.nbytes and os.preadv(ref.fd, [memoryview(buf.numpy())], ref.offset) != ref.nbytes:
        raise HFCheckpointError(f"{ref.path}: a tensor at byte {ref.offset} is truncated")
    return buf.view(ref.dtype).reshape(ref.shape)


def _tensor_refs(path: Path, fd: int) -> list[tuple[str, TensorRef]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # validates the header and every offset
            names = list(handle.keys())
            kinds = {n: (sl.get_dtype(), tuple(sl.get_shape())) for n in names for sl in [handle.get_slice(n)]}
        header, base = _offsets(path)
    except Exception as exc:
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    refs = []
    for name in names:
        dtype, shape = kinds[name]
        if dtype not in _TORCH_DTYPES:
            raise HFCheckpointError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        start, end = header[name]["data_offsets"]
        refs.append((name, TensorRef(path, fd, base + start, end - start, _TORCH_DTYPES[dtype], shape)))
    return refs


@contextlib.contextmanager
def open_tensor_refs(shards: list[Path]) -> Iterator[list[tuple[str, TensorRef]]]:
    """(name, TensorRef) of every tensor of ``shards``, in file order; the files stay open inside the block.

    Nothing is read but the headers: a writer copies the bytes file to file (``os.copy_file_range``) or
    ``read_tensor`` reads one tensor where it must be transformed.
    """
    fds: list[int] = []
    try:
        refs = []
        for shard in shards:
            fds.append(os.open(shard, os.O_RDONLY))
            refs += _tensor_refs(Path(shard), fds[-1])
        yield refs
    finally:
        for fd in fds:
            os.close(fd)


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of one safetensors file, each read into its own buffer."""
    with open_tensor_refs([path]) as refs:
        for name, ref in refs:
            yield name, read_tensor(ref)


def iter_hf_tensors(shards: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in shards:
        yield from iter_safetensors(shard)


class ShardedWriter:
    """Write tensors into ``model-0000i-of-0000n.safetensors`` shards of about ``max_shard_bytes``."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buf or any(name in names for _, names in self._files):
            raise HFCheckpointError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buf[name] = tensor.contiguous()
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def names(self) -> list[str]:
        return [*(n for _, names in self._files for n in names), *self._buf]

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".shard-{len(self._files):05d}.safetensors"
        save_file(self._buf, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, give the shards their final names, write the index if several; return the files."""
        if self._buf or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            final = self.out_dir / SINGLE_NAME
            os.replace(self._files[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._files):
            final = self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({k: final.name for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return finals


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer / generation files that exist in ``src`` to ``dst``; return their names."""
    copied = []
    for name in SIDE_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied


def check_empty_target(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output directory {out_dir} exists and is not empty; choose a new path")


def temp_dir_beside(out_dir: Path) -> Path:
    """A fresh temp dir next to ``out_dir`` (same filesystem, so the final rename is atomic)."""
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (and ``root``), deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in [*filenames, "."]:
            fsync_path(Path(dirpath) / name)


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir onto ``out_dir`` (which may exist only as an empty dir)."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked before the work started
    os.replace(tmp, out_dir)
