"""The object store of job images: a small interface, a local folder by default, any fsspec
filesystem (S3-compatible stores through s3fs, GCS, Azure...) by URL.

Keys are relative POSIX paths (`<job_id>/<index>`). `put` returns only once the bytes are durable:
the local store writes a temporary file, fsyncs it, renames it into place and fsyncs the folder, so
a crash leaves either the whole object or none; an fsspec store relies on its backend (an S3 PUT is
durable when it returns).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol


class ObjectStore(Protocol):
    """What the jobs need from an object store."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, durably, replacing what was there."""

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """`put` of every (key, data), concurrently; durable when it returns."""

    def get(self, key: str) -> bytes:
        """The bytes under `key`; FileNotFoundError when there are none."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix` (a missing prefix is fine)."""


def get_many(store: ObjectStore, keys: Sequence[str]) -> list[bytes | None]:
    """The bytes under each key (None where there are none), read concurrently: a worker's chunk
    from S3 takes one round trip's time, not one per image."""

    def get(key: str) -> bytes | None:
        try:
            return store.get(key)
        except FileNotFoundError:
            return None

    return _threaded(get, keys)


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class LocalObjectStore:
    """Objects as files under a folder (the embedded default)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def put(self, key: str, data: bytes) -> None:
        _fsync_dir(self._write(key, data).parent)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        # Each file is fsynced (in threads: fsync releases the GIL), each folder once at the end.
        folders = {p.parent for p in _threaded(lambda item: self._write(*item), items)}
        for folder in folders:
            _fsync_dir(folder)

    def _write(self, key: str, data: bytes) -> Path:
        """Write `data` to a temporary file, fsync it and rename it into place; the final path."""
        path = self.root / _check_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def get(self, key: str) -> bytes:
        return (self.root / _check_key(key)).read_bytes()

    def delete_prefix(self, prefix: str) -> None:
        import shutil

        target = self.root / _check_key(prefix.rstrip("/"))
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


class FsspecObjectStore:
    """Objects in any fsspec filesystem, e.g. `s3://bucket/prefix` (pip install s3fs; credentials
    and endpoint from the usual AWS_* variables or fsspec's configuration)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        import fsspec

        self.url = url
        self.fs, self.base = fsspec.core.url_to_fs(url, **storage_options)
        self.base = self.base.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.base}/{_check_key(key)}"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)  # a no-op on object stores, needed on local/NFS paths
        self.fs.pipe_file(path, data)

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        _threaded(lambda item: self.put(*item), items)

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def open_object_store(url: str) -> ObjectStore:
    """A folder path (or file:///...) -> LocalObjectStore; any other URL -> FsspecObjectStore."""
    if "://" not in url:
        return LocalObjectStore(url)
    if url.startswith("file:///"):
        return LocalObjectStore(url[len("file://"):])
    return FsspecObjectStore(url)


def _threaded(fn: Callable[[Any], Any], items: Sequence[Any], threads: int = 8) -> list[Any]:
    """`fn` over `items` in a few threads (object writes wait on disks and networks), in order."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
