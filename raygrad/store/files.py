"""Durable writes: a file replaced only once it is whole, and flushes to disk.

Zarr renames each chunk into place but does not flush it; exports and the
store's state file are written under a temporary name and renamed, and so are
whole directories (an export set, a comparison).

A temporary name is `.{name}.{8 random characters}.partial` beside its target, created
by tempfile (O_CREAT | O_EXCL | O_NOFOLLOW): a file or symlink planted at a guessed
name is never opened, so never written through; the rename replaces a link at the
target itself rather than following it. Leftovers of a killed writer (that pattern,
or the fixed `.{name}.partial` of earlier versions) are removed by the next write of
the same target, links unlinked, never followed. A write into a run directory whose
lock this process has lost to another stops first (lock.ensure_held)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from .lock import ensure_held

PARTIAL_SUFFIX = ".partial"  # the end of every temporary name (readers and cleanup recognize it)
# The permissions open() would give a new file or directory: mkstemp/mkdtemp make them private (0600/0700).
# Read once, at import (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def replacing(path: Path):
    """A binary handle on a new temporary file beside `path`, renamed onto `path` only once it is
    completely written and flushed: a full disk or a kill never leaves a truncated file, and an
    earlier version stays until the new one is whole."""
    path = Path(path)
    ensure_held(path)
    _clear_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    temporary = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        ensure_held(path)  # the lock may have been lost while the block wrote: the rename is the write
        os.replace(temporary, path)
        fsync_dir(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing_directory(target: Path):
    """A new hidden staging directory beside `target` (those left by a killed writer are cleared
    first), renamed onto `target` once the block has written it whole: a failure or a kill never
    leaves a half-written directory under the visible name."""
    target = Path(target)
    ensure_held(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)
        yield staging
        ensure_held(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _is_temporary(name: str, target: str) -> bool:
    """Whether `name` is a temporary name of `target` (this version's, or the fixed one of earlier ones)."""
    return re.fullmatch(rf"\.{re.escape(target)}(\.[a-z0-9_]{{8}})?{re.escape(PARTIAL_SUFFIX)}", name) is not None


def _clear_leftovers(target: Path) -> None:
    """Remove the temporary files or directories a killed writer of `target` left beside it."""
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return
    for entry in entries:
        if not _is_temporary(entry.name, target.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)  # a file, or a planted link: the link goes, its target stays


def sync_tree(root: Path, only: tuple[str, ...] | None = None) -> None:
    """fsync the files (and directories) under these names in `root`, or all of `root`."""
    tops = [root / name for name in only] if only is not None else [root]
    for top in tops:
        if top.is_file():
            fsync_file(top)
            continue
        for directory, _, files in os.walk(top):
            for file in files:
                fsync_file(Path(directory) / file)
            fsync_dir(Path(directory))
    fsync_dir(root)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems refuse to fsync a directory; the files are flushed
        pass
