"""Raw file access for the offloaded runtime: safetensors headers, positioned reads, layer blob files.

Reads go through `os.preadv` into caller-owned buffers (a pinned staging buffer on CUDA, the ring
slot itself on CPU) and are followed by `posix_fadvise(DONTNEED)` on the range just read, so that
streaming a target from disk every forward does not grow the page cache without bound. A layer's
ranges can be cut into chunks (`read_chunk()`) that several threads read at once (`read_threads()`), for
drives that need a queue depth above 1 to reach their sequential bandwidth; `os.preadv` releases the
GIL, so plain threads suffice. Buffered reads cost CPU (the kernel copies every byte: ~0.6 of a core
at 1.7 GB/s here), which a 2-core machine takes from the computation.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON
(`{name: {"dtype": "F16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`),
then the data; `data_offsets` count from the first byte after the header.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from specexec_cli.errors import SpecexecError, UsageError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_HAS_FADVISE = hasattr(os, "posix_fadvise")
# Reads in flight per streaming FileReader, and the bytes per read request when there are several.
# Measured here (virtual disk, 2 cores, cold reads of the bundled 1.5B, docs/benchmarks.md): one 64 MiB
# read at a time 1.4-1.9 GB/s; 4 x 1 MiB 0.6-2.0 GB/s; 4 x 16 MiB 0.5 GB/s; O_DIRECT 0.5 GB/s. So one
# large read at a time is the default; an NVMe drive may do better with SPECEXEC_READ_THREADS=4.


def env_int(name: str, default: int, low: int, high: int) -> int:
    """An integer environment setting in [low, high]; a bad value is a one-line usage error."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a whole number (use {low}..{high})") from None
    if not low <= value <= high:
        raise UsageError(f"{name}={value} is out of range (use {low}..{high})")
    return value


def read_threads() -> int:
    """Reads in flight per streamed layer (SPECEXEC_READ_THREADS, default 1)."""
    return env_int("SPECEXEC_READ_THREADS", 1, 1, 64)


def read_chunk() -> int:
    """Bytes per read when several are in flight (SPECEXEC_READ_CHUNK_MIB, default 1 MiB)."""
    return env_int("SPECEXEC_READ_CHUNK_MIB", 1, 1, 1024) << 20


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: absolute file offset and size, plus its dtype and shape."""

    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ReadOp:
    """Copy `nbytes` from `path` at `offset` to byte `dst_offset` of a layer buffer."""

    path: str
    offset: int
    nbytes: int
    dst_offset: int


MAX_HEADER_BYTES = 100 << 20  # a larger header length means the file is not safetensors


def read_raw_header(path: str | os.PathLike) -> tuple[int, dict]:
    """(header length, header JSON object) of a safetensors file; ValueError when it is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise ValueError(f"header length {header_len} is implausible")
        raw = f.read(header_len)
    if len(raw) < header_len:
        raise ValueError("the header is cut short")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"the header is not valid ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not valid (not a JSON object)")
    return header_len, header


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorLocation]:
    """Parse one safetensors file's header into absolute tensor locations (no tensor data is read)."""
    path = str(path)
    header_len, header = read_raw_header(path)
    data_start = 8 + header_len
    out: dict[str, TensorLocation] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise SpecexecError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = TensorLocation(
            path, data_start + begin, end - begin, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        )
    return out


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded or not)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SpecexecError(
            f"no .safetensors files in {directory}; only safetensors checkpoints can be offloaded"
        )
    return files


def drop_cache(fd: int, offset: int, nbytes: int) -> None:
    """Tell the kernel the range will not be needed again (keeps the page cache bounded)."""
    if _HAS_FADVISE and nbytes > 0:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


class FileReader:
    """Positioned reads from a fixed set of files, with open descriptors kept for the reader's life.

    `threads` > 1 splits `run`'s ranges into `chunk`-byte pieces read concurrently (queue depth =
    threads); 1 reads each range with one call on the caller's thread.
    """

    def __init__(self, drop_page_cache: bool = True, threads: int = 1, chunk: int | None = None) -> None:
        self._fds: dict[str, int] = {}
        self.drop_page_cache = drop_page_cache
        self.threads = max(1, threads)
        self.chunk = chunk if chunk is not None else read_chunk()
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="specexec-read") if self.threads > 1 else None
        )

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read_into(self, path: str, offset: int, dst: torch.Tensor) -> None:
        """Fill the CPU uint8 tensor `dst` [n] from `path` at `offset`."""
        fd = self._fd(path)
        view = memoryview(dst.numpy()).cast("B")
        total, done = len(view), 0
        while done < total:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read from {path} at byte {offset + done}: wanted {total - done} more")
            done += n
        if self.drop_page_cache:
            drop_cache(fd, offset, total)

    def run(self, ops: Iterable[ReadOp], dst: torch.Tensor) -> None:
        """Execute read ops into the CPU uint8 buffer `dst` [>= max(dst_offset + nbytes)]."""
        if self._pool is None:
            for op in ops:
                self.read_into(op.path, op.offset, dst[op.dst_offset : op.dst_offset + op.nbytes])
            return
        pieces = []
        for op in ops:
            self._fd(op.path)  # open on this thread: the dict is not shared while workers run
            for start in range(0, op.nbytes, self.chunk):
                n = min(self.chunk, op.nbytes - start)
                pieces.append((op.path, op.offset + start, op.dst_offset + start, n))
        futures = [
            self._pool.submit(self.read_into, path, offset, dst[d : d + n]) for path, offset, d, n in pieces
        ]
        wait(futures)  # no read may still be writing into `dst` when an error propagates
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class CheckpointIndex:
    """All tensors of a safetensors checkpoint directory, by name, read on demand without mmap."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.files = safetensors_files(self.directory)
        self.locations: dict[str, TensorLocation] = {}
        for file in self.files:
            self.locations.update(read_safetensors_header(file))
        self._reader = FileReader()

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def read(self, name: str) -> torch.Tensor:
        """One tensor as a fresh CPU tensor in its stored dtype and shape."""
        loc = self.locations[name]
        raw = torch.empty(loc.nbytes, dtype=torch.uint8)
        self._reader.read_into(loc.path, loc.offset, raw)
        return raw.view(loc.dtype).reshape(loc.shape)

    def total_bytes(self) -> int:
        return sum(loc.nbytes for loc in self.locations.values())

    def close(self) -> None:
        self._reader.close()


class BlobWriter:
    """Append-only file of layer blobs at 4096-byte aligned offsets (the disk tier's converted cache)."""

    ALIGN = 4096

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._end = 0

    def append(self, data: torch.Tensor) -> int:
        """Write the CPU uint8 tensor `data` [n]; return its file offset. Written pages are dropped."""
        offset = -(-self._end // self.ALIGN) * self.ALIGN
        view = memoryview(data.numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        os.fdatasync(self._fd)
        drop_cache(self._fd, offset, len(view))
        self._end = offset + len(view)
        return offset

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def measure_read_bandwidth(
    path: str | os.PathLike, nbytes: int, chunk: int = 64 << 20, threads: int = 1
) -> float:
    """Sequential cold read bandwidth of a file in bytes/s (drops its cache first); for benchmarks.

    threads > 1 keeps that many `read_chunk()` reads in flight, as the streaming engine does."""
    import time

    path = str(path)
    nbytes = min(nbytes, os.path.getsize(path))
    fd = os.open(path, os.O_RDONLY)
    reader = FileReader(threads=threads)
    try:
        drop_cache(fd, 0, nbytes)
        buf = torch.empty(min(chunk, nbytes), dtype=torch.uint8)
        start = time.perf_counter()
        done = 0
        while done < nbytes:
            n = min(chunk, nbytes - done)
            reader.run([ReadOp(path, done, n, 0)], buf)
            done += n
        elapsed = time.perf_counter() - start
    finally:
        reader.close()
        os.close(fd)
    return nbytes / elapsed
