"""Reading and writing inputs and outputs, on local paths or fsspec URLs.

Relative paths resolve against the configured data location, so every worker, pod and
process sees the same file at the same address. Writes are atomic (temporary file, then
rename) so a retried or restarted step never leaves half a result or a duplicate.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from taskserver.errors import InvalidInputError, StorageFullError, TaskserverError
from taskserver.samples import SAMPLES_DIR, SAMPLES_PREFIX
from taskserver.settings import get_settings


def is_url(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str | os.PathLike[str], base: str | None = None) -> str:
    """An absolute local path or a full URL for ``location``.

    Relative locations are taken under ``base`` (default: the configured data location).
    """
    location = os.fspath(location)
    if is_url(location):
        return location
    if location.startswith(SAMPLES_PREFIX):
        return os.path.normpath(os.path.join(SAMPLES_DIR, location.removeprefix(SAMPLES_PREFIX)))
    path = os.path.expanduser(location)
    if os.path.isabs(path):
        return os.path.normpath(path)
    base = base if base is not None else get_settings().data_location
    if is_url(base):
        return base.rstrip("/") + "/" + location
    return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(base)), path))


def relative(location: str) -> str:
    """``location`` as a person reads it: under the data location relative to it, a shipped sample as
    ``samples:NAME``, anything else (another folder, a URL) unchanged."""
    resolved = resolve(location)
    base = get_settings().data_location
    for root, prefix in ((base, ""), (os.fspath(SAMPLES_DIR), SAMPLES_PREFIX)):
        root = root if is_url(root) else os.path.abspath(os.path.expanduser(root))
        if resolved.startswith(root.rstrip("/") + "/"):
            return prefix + resolved[len(root.rstrip("/")) + 1:]
    return resolved


def join(location: str, *parts: str) -> str:
    location = resolve(location)
    if is_url(location):
        return posixpath.join(location, *parts)
    return os.path.join(location, *parts)


def basename(location: str) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(resolve(location))


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.exists(path)


def makedirs(location: str) -> str:
    fs, path = filesystem(location)
    with _storage_errors(location):
        fs.makedirs(path, exist_ok=True)
    return resolve(location)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    if not fs.exists(path):
        raise InvalidInputError(location, "file not found")
    return fs.cat_file(path)


@contextlib.contextmanager
def _storage_errors(location: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(
                location, "no space left on the device", "free space or choose another output location"
            ) from exc
        raise


@contextlib.contextmanager
def open_output(location: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``location`` for writing; the file appears only when the block succeeds."""
    target = resolve(location)
    fs, path = url_to_fs(target)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path)
        with _storage_errors(target):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with _storage_errors(target):
                with os.fdopen(fd, mode) as handle:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    else:
        # Object stores write a whole object on close, which is already atomic.
        tmp_name = f"{path}.{uuid.uuid4().hex}.tmp"
        with _storage_errors(target):
            with fs.open(tmp_name, mode) as handle:
                yield handle
            fs.mv(tmp_name, path)


def write_bytes(location: str, data: bytes) -> str:
    with open_output(location, "wb") as handle:
        handle.write(data)
    return resolve(location)


def write_text(location: str, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


@contextlib.contextmanager
def local_path(location: str) -> Iterator[Path]:
    """A local filesystem path for ``location``, downloading remote files to a temporary copy."""
    target = resolve(location)
    fs, path = url_to_fs(target)
    if not is_url(target) or target.startswith("file://"):
        yield Path(path)
        return
    tmpdir = tempfile.mkdtemp(prefix="taskserver-")
    try:
        local = os.path.join(tmpdir, posixpath.basename(path.rstrip("/")))
        fs.get(path, local, recursive=fs.isdir(path))
        yield Path(local)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def output_dir(location: str) -> Iterator[Path]:
    """A local directory to write into; remote locations receive its contents on success."""
    target = resolve(location)
    if not is_url(target) or target.startswith("file://"):
        fs, path = url_to_fs(target)
        with _storage_errors(target):
            os.makedirs(path, exist_ok=True)
        yield Path(path)
        return
    fs, path = url_to_fs(target)
    tmpdir = tempfile.mkdtemp(prefix="taskserver-out-")
    try:
        yield Path(tmpdir)
        with _storage_errors(target):
            fs.put(tmpdir + "/", path, recursive=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def read_text(location: str, error: type[TaskserverError] = InvalidInputError) -> str:
    """A text file's content as UTF-8 (a leading BOM dropped); other bytes raise ``error`` naming the file."""
    raw = read_bytes(location)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(location, f"not UTF-8 text ({exc.reason} at byte {exc.start})", "save the file as UTF-8") from None


def json_lines(
    content: str, location: str, error: type[TaskserverError] = InvalidInputError
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of JSONL; invalid JSON raises ``error`` naming the line."""
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{location} line {number}", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
