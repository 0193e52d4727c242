"""Durable writes: a file replaced only once it is whole, and flushes to disk.

Zarr renames each chunk into place but does not flush it; exports and the
store's state file are written under a temporary name and renamed, and so are
whole directories (an export set, a comparison)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path):
    """A binary handle on a temporary file beside `path`, renamed onto `path` only once it is
    completely written and flushed: a full disk or a kill never leaves a truncated file, and an
    earlier version stays until the new one is whole."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_dir(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing_directory(target: Path):
    """A hidden staging directory beside `target` (one left by a killed writer is cleared first),
    renamed onto `target` once the block has written it whole: a failure or a kill never leaves a
    half-written directory under the visible name."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


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
