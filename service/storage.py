"""Blob storage behind a small interface; :class:`LocalStorage` keeps objects in a directory.

Keys are ``/``-separated relative paths. A remote implementation (S3) would implement the same methods and
make :meth:`Storage.local_path` download to a cache folder.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import BinaryIO

CHUNK = 1024 * 1024


class Storage(ABC):
    """Minimal object store used by the API and the workers."""

    @abstractmethod
    def put(self, key: str, data: bytes | BinaryIO) -> str:
        """Store bytes or a file object under ``key``; returns the sha256 of what was written."""

    @abstractmethod
    def put_path(self, key: str, path: Path, move: bool = False) -> None:
        """Store a local file or folder tree under ``key`` (moved when ``move`` and possible)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Whole object as bytes."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Readable binary file object."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (or a prefix holding objects) exists."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object or every object under a prefix; missing keys are ignored."""

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local filesystem path holding the object or prefix (for the ML core, which reads files)."""

    @abstractmethod
    def scratch_dir(self) -> Path:
        """A fresh local folder for staging uploads or results, on the same filesystem when possible."""

    def probe(self) -> None:
        """Write, read back and delete a small object (readiness check)."""
        key = f".probe/{uuid.uuid4().hex}"
        self.put(key, b"ok")
        if self.get(key) != b"ok":
            raise OSError("storage read-back mismatch")
        self.delete(key)


class LocalStorage(Storage):
    """Objects are files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".scratch").mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or any(p in ("..", "") or p.startswith("/") for p in parts) or key.startswith("/"):
            raise ValueError(f"invalid storage key: {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes | BinaryIO) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            if isinstance(data, bytes | bytearray | memoryview):
                digest.update(data)
                out.write(data)
            else:
                while chunk := data.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        tmp.replace(path)
        return digest.hexdigest()

    def put_path(self, key: str, path: Path, move: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            self.delete(key)
        if move:
            shutil.move(str(path), str(dest))
        elif path.is_dir():
            shutil.copytree(path, dest)
        else:
            shutil.copy2(path, dest)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def open(self, key: str) -> BinaryIO:
        return self._path(key).open("rb")

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def scratch_dir(self) -> Path:
        path = self.root / ".scratch" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path


def get_storage(root: Path) -> LocalStorage:
    """The configured storage backend."""
    return LocalStorage(root)
