"""Host kernels in plain C, compiled on first use with the system C compiler (a CPython extension, or ctypes).

Why: the AMIR pair statistics are a few hundred per-sequence numbers per rank. As torch ops they are about
twenty tiny calls (twenty kernel launches on a GPU); in a training step, where the caches are cold, each
costs several microseconds, and together they were most of the pair term's overhead on top of GRPO
(docs/benchmarks.md, loss_overhead). One C call does the same work in a few microseconds.

The build needs nothing beyond ``cc`` (``$CC`` if set): no torch headers, no ninja; it takes about 0.2 s
once. Where Python's headers are installed the kernel is built as a CPython extension (a METH_FASTCALL
function: ~13 µs less per call than ctypes' argument conversion and libffi, measured in the training
step); without them, or with ``MEGATRON_AMIR_NATIVE=ctypes``, as a plain library called through ctypes.
The library goes to ``$MEGATRON_AMIR_CACHE/kernels`` (default ``~/.cache/megatron_amir/kernels``) under a
name that hashes the source, the compiler, its flags (and, for the extension, the Python version), so an
edited source is rebuilt and concurrent ranks are safe (each builds to its own temp file, then renames).
No ``-march=native``: a cache in a shared home directory must load on every node type. A cached library is
loaded only when this user (or root) owns it and its directory and nobody else can write or swap it (the
directory is not writable by others, or sticky); otherwise a private copy is built.

With ``MEGATRON_AMIR_NATIVE=0``, or when neither build loads (no compiler, read-only cache; one warning),
``pair_kernel()`` returns None and callers use their torch implementation, which gives the same results
(tests compare both with a float64 loop).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import platform
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_amir import fileio  # the cache root

log = logging.getLogger(__name__)

_FLAGS = ("-O2", "-std=c99", "-shared", "-fPIC")
_SOURCES = {"pair": Path(__file__).with_name("pair_kernel.c")}
_lock = threading.Lock()
_loaded: dict[str, Optional[Callable[..., int]]] = {}


def enabled() -> bool:
    """False when ``MEGATRON_AMIR_NATIVE`` is 0/false/no/off (``ctypes``: native, but no CPython extension)."""
    return _mode() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    return fileio.cache_dir() / "kernels"


def _mode() -> str:
    return os.environ.get("MEGATRON_AMIR_NATIVE", "1").strip().lower()


def python_include() -> Optional[Path]:
    """The directory holding this interpreter's Python.h, or None when the headers are not installed."""
    inc = sysconfig.get_paths().get("include")
    return Path(inc) if inc and (Path(inc) / "Python.h").is_file() else None


def build(src: Path, out_dir: Optional[Path] = None, python_ext: bool = False) -> Path:
    """Compile ``src`` into a shared library in the cache (reused when present); returns its path.

    ``python_ext``: build it as a CPython extension module (``-DAMIR_PYTHON_EXT`` against this interpreter's
    headers, named with its ABI suffix); raises when the headers are missing.
    """
    cc = os.environ.get("CC", "cc")
    code = src.read_bytes()
    flags: tuple[str, ...] = _FLAGS
    suffix = ".so"
    if python_ext:
        inc = python_include()
        if inc is None:
            raise RuntimeError(f"no Python.h under {sysconfig.get_paths().get('include')}")
        flags = (*_FLAGS, "-DAMIR_PYTHON_EXT", f"-I{inc}")
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    key = [code, cc.encode(), " ".join(flags).encode(), platform.machine().encode()]
    if python_ext:
        key.append(sys.version.encode())
    tag = hashlib.sha256(b"\0".join(key))
    out_dir = cache_dir() if out_dir is None else out_dir
    lib = out_dir / f"{src.stem}{'-py' if python_ext else ''}-{tag.hexdigest()[:16]}{suffix}"
    if lib.is_file():
        if _trusted(lib):
            return lib
        # a shared cache: never load code another user could have written; build a private copy instead
        log.warning("%s is not ours or is writable by others: building a private copy", lib)
        out_dir = Path(tempfile.mkdtemp(prefix="megatron_amir_kernels."))
        lib = out_dir / lib.name
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{lib.name}.", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(src), "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {src} (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o644)  # readable by the other users of a shared cache, writable by us only (see _trusted)
        os.replace(tmp, lib)  # atomic: a concurrent rank sees either no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _trusted(lib: Path) -> bool:
    """A cached library may be loaded if this user (or root) owns it and its directory, nobody else can write
    it, and nobody else can swap it: the directory is not writable by others, or sticky (like /tmp)."""
    st, dst = lib.stat(), lib.parent.stat()
    ours = (os.getuid(), 0)
    return (st.st_uid in ours and not st.st_mode & 0o022 and dst.st_uid in ours
            and (not dst.st_mode & 0o022 or bool(dst.st_mode & stat.S_ISVTX)))


def _bind_pair(lib: ctypes.CDLL) -> Callable[..., int]:
    fn = lib.amir_pair_stats
    p, i64, f64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    fn.argtypes = [i64, i64, p, p, p, p, cint, f64, p, cint, f64, cint, p, p, cint]
    fn.restype = cint
    return fn


def pair_kernel() -> Optional[Callable[..., int]]:
    """The ``amir_pair_stats`` C function (signature in pair_kernel.c), or None when it cannot be had."""
    try:
        return _loaded["pair"]
    except KeyError:
        pass
    with _lock:
        if "pair" not in _loaded:
            _loaded["pair"] = _load("pair", _bind_pair)
    return _loaded["pair"]


def _import_ext(lib: Path, module: str) -> Any:
    spec = importlib.util.spec_from_file_location(module, lib)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {lib}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_and_open(src: Path, open_: Callable[[Path], Any], python_ext: bool) -> Any:
    lib = build(src, python_ext=python_ext)
    try:
        return open_(lib)
    except (OSError, ImportError):
        lib.unlink(missing_ok=True)  # a damaged cache entry: build it again once
        return open_(build(src, python_ext=python_ext))


def _load(name: str, bind: Callable[[ctypes.CDLL], Callable[..., int]]) -> Optional[Callable[..., int]]:
    if not enabled():
        return None
    src = _SOURCES[name]
    if _mode() != "ctypes" and python_include() is not None:
        try:
            mod = _build_and_open(src, lambda p: _import_ext(p, f"_amir_{name}_ext"), True)
            return getattr(mod, f"amir_{name}_stats")
        except Exception as exc:  # noqa: BLE001 - the ctypes build below needs no headers
            log.info("native %s kernel: no CPython extension (%s); using ctypes", name, exc)
    try:
        return bind(_build_and_open(src, lambda p: ctypes.CDLL(str(p)), False))
    except Exception as exc:  # noqa: BLE001 - any failure means: use the torch implementation
        log.warning("native %s kernel unavailable (%s); using the torch implementation "
                    "(set MEGATRON_AMIR_NATIVE=0 to silence)", name, exc)
        return None


def reset() -> None:
    """Forget loaded kernels (tests; a changed MEGATRON_AMIR_NATIVE / cache dir takes effect next call)."""
    with _lock:
        _loaded.clear()
