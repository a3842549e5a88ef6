"""Real failing filesystems for the usage-journal fault tests: a small tmpfs that fills up,
or one mounted read-only. Mounting needs CAP_SYS_ADMIN (the tests run as root, where
`chmod 0o500` binds nobody); without it the tests that need one are skipped, saying why."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextmanager
def tmpfs(path: Path, *, size_kb: int = 256, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size_kb` mounted at `path` (made if need be), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k,mode=0700" + (",ro" if read_only else "")
    result = _mount("-t", "tmpfs", "-o", options, "tmpfs", str(path))
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount(path: Path, *, read_only: bool) -> None:
    """Mount the tmpfs at `path` read-only or read-write again (no file open for writing
    on it may be open to make it read-only: the kernel says EBUSY)."""
    result = _mount("-o", f"remount,{'ro' if read_only else 'rw'}", str(path))
    assert result.returncode == 0, result.stderr


def fill(directory: Path) -> Path:
    """Write a file in `directory` until its filesystem is full (ENOSPC); returns it:
    delete it to make room again."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\0" * 4096
        for _ in range(1_000_000):  # bounded: a tmpfs of a few MiB at most is filled far sooner
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler
        raise AssertionError(f"{directory} never filled up")
    finally:
        os.close(fd)
