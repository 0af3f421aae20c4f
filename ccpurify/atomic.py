"""Atomic writes: write to a temporary file (or folder) beside the target, then rename it.

A crash or an exception mid-write leaves the previous file (or nothing), never half a file; a run
directory appears complete or not at all (``atomic_directory``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ccpurify.errors import InvalidInputError, InvalidTypeError, OutputExistsError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    For writers that want a file name rather than a file object (safetensors, onnx, numpy).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the file's own suffix last, so that readers that go by it (a verifying load) read the temporary file
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def refuse_existing(path: str | os.PathLike, overwrite: bool, what: str = "the output", folder: bool = False) -> None:
    """``OutputExistsError`` when ``path`` exists (a file, or a folder that is not empty) and replacing
    it was not asked for, or when it is a folder where a file (``folder=False``) is to be written."""
    target = Path(path)
    empty_folder = target.is_dir() and not any(target.iterdir())
    if target.is_dir() and not folder:
        raise OutputExistsError(f"{what} {path} is a folder; name a file")
    if target.exists() and not target.is_dir() and folder:
        raise OutputExistsError(f"{what} {path} is a file; name a folder")
    if target.exists() and not empty_folder and not overwrite:
        raise OutputExistsError(
            f"{what} {path} exists; choose another path or pass --overwrite (overwrite=True) to replace it"
        )


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds it becomes ``path``.

    An existing ``path`` is refused unless ``overwrite`` (then it is replaced only once the new
    folder is complete). On an exception or an interrupt the temporary folder is removed, so a
    reader sees the old result or the new one, never a mix of both.
    """
    target = Path(path)
    refuse_existing(target, overwrite, "the output folder", folder=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the folder the usual mode
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned(target: Path) -> None:
    """Remove temporary folders for ``target`` left by a process that was killed (SIGKILL, or a
    SIGTERM while it was inside native code, where Python cannot clean up): their pid is gone."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = stale.name[len(target.name) + 2 :].split(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[BinaryIO]:
    """``open()`` that replaces ``path`` only when the ``with`` block finishes without error."""
    if mode not in ("w", "wb"):
        raise InvalidInputError("atomic_open supports 'w' and 'wb'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths and dataclass-like objects show up in reports.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise InvalidTypeError(f"cannot serialise {type(obj).__name__} to JSON")
