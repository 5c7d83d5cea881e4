"""Writes that never leave a torn file: a locked temp file beside the target, fsync, rename; the output
folder proven writable before any model loads; temp files of dead writers cleaned, never a live one's."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..base.errors import DiskFullError, OutputError, OutputFolderError
from .locks import host_name, lock_fd, pid_alive

TEMP_MARKER = ".part-"


STALE_FOREIGN_TEMP_SECONDS = 60  # another host's unlocked temp file: stale once this old (see clean_stale_temps)


ENOSPC_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def prepare_folder(folder: Path) -> Path:
    """Create the output folder if needed and prove it is writable, before any model loads (bad input: exit 2)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not folder.is_dir():
        raise OutputFolderError(f"output path {folder} exists and is not a folder")
    probe = folder / f".probe-{host_name()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(f"output folder {folder} is not writable: {exc.strerror or exc}") from exc
    return folder


def check_folder(folder: Path) -> None:
    """What `prepare_folder` proves (the folder can be made and written), leaving nothing behind: a dry run
    refuses what the run would refuse, and writes nothing."""
    made: list[Path] = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    try:
        prepare_folder(folder)
    finally:
        for path in made:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()


def _temp_owner() -> str:
    return f"{host_name()}-{os.getpid()}"


def clean_stale_temps(folder: Path) -> int:
    """Remove temp files whose writer is provably gone; never another live writer's.

    A writer holds a lock on its temp file while it writes (see `atomic_file`), so a temp file we can lock has
    no live writer, except in the instant between its creation and its lock. To rule that instant out: a temp
    file of this host is removed only if its process is gone; another host's, only when also a minute old."""
    removed = 0
    mine = _temp_owner()
    for path in folder.glob(f".*{TEMP_MARKER}*"):
        owner = path.name.rsplit(TEMP_MARKER, 1)[-1]
        host, _, pid_text = owner.rpartition("-")
        if owner == mine or not pid_text.isdigit():
            continue
        if host == host_name() and pid_alive(int(pid_text)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # a planted link or a vanished file: leave it alone
        try:
            info = os.fstat(fd)
            foreign_and_young = host != host_name() and time.time() - info.st_mtime < STALE_FOREIGN_TEMP_SECONDS
            if stat.S_ISREG(info.st_mode) and lock_fd(fd) is True and not foreign_and_young:
                path.unlink()
                removed += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write to a locked temp file beside `path`, fsync, rename into place; on any failure remove the temp file.

    The temp file's name says which host and process write it, and the writer holds a lock on it until the
    rename: `clean_stale_temps` in another task can tell a live write from a dead one."""
    temp = path.with_name(f".{path.name}{TEMP_MARKER}{_temp_owner()}")
    try:
        with os.fdopen(_create_exclusive(temp), "wb") as handle:
            lock_fd(handle.fileno())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temp, path)  # replaces a link at `path` itself, never what it points to (lock still held)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError):
            kind = DiskFullError if exc.errno in ENOSPC_ERRNOS else OutputError
            raise kind(f"could not write {path}: {exc.strerror or exc}") from exc
        raise
    fsync_dir(path.parent)


def _create_exclusive(temp: Path) -> int:
    """Create the temp file anew: never follow a link planted at its name, never append to a stale one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        return os.open(temp, flags, 0o644)
    except FileExistsError:
        temp.unlink()  # ours by name (this host, this pid: a dead namesake's) or a planted link: remove, recreate
        return os.open(temp, flags, 0o644)


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)
