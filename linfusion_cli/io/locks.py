"""File locks that die with their process: per-job claims in a batch, and proof that a temp file is stale.

A lock here is `flock(LOCK_EX | LOCK_NB)` on an open file. The kernel drops it when the process ends, however it
ends (kill -9, OOM killer, node reboot), so a crashed task never leaves a job claimed forever and nothing has to
guess from timestamps whether an owner is alive. On NFS, Linux emulates flock with POSIX byte-range locks held
by the server (NLM for v3, leases for v4), so tasks on different nodes exclude each other too; a node that dies
keeps its locks until the server's lease runs out (about 90 s on v4). Where the filesystem offers no locks at
all (ENOLCK), a claim still works within one node and the caller is told.

Removing a lock file safely: the holder unlinks it while still holding the lock, and whoever locks a file
checks afterwards that the name still points at the inode it locked (else it locked a removed file and retries).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; claims and stale-temp proofs are then unavailable
    fcntl = None  # type: ignore[assignment]

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def host_name() -> str:
    """This machine's name as it may appear in a file name."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32].strip("-") or "host"


def lock_fd(fd: int) -> bool | None:
    """Try to lock an open file: True if locked now, False if a live process holds it, None if this
    filesystem has no locks."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EINVAL, ENOTSUP: locks not offered here


@dataclass
class Claim:
    """A held claim on a job: `release()` (or process death) lets another task take it."""

    path: Path
    fd: int
    locked: bool  # False where the filesystem has no locks: the claim then only marks the job

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding the lock: see the module docstring
        os.close(self.fd)
        self.fd = -1


def try_claim(path: Path) -> Claim | str:
    """Claim `path` (created if needed): a Claim, or a description of the live owner holding it."""
    while True:
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{path.name} is a symbolic link, not a claim file"
            raise OutputError(f"cannot create the claim file {path}: {exc.strerror or exc}") from None
        state = lock_fd(fd)
        if state is False:
            owner = _read_owner(fd)
            os.close(fd)
            return owner or "another task"
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner removed it between our open and our lock: take the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {host_name()}\n".encode())
        return Claim(path, fd, locked=state is True)


def _read_owner(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    return ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True
