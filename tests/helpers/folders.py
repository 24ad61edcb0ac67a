"""What a folder holds (a checksum listing), and folders that refuse writes: read-only, or on a full disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def listing(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` (hidden ones too) -> its SHA-256 (files), its target (links) or "dir"."""
    out = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            out[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[name] = "dir"
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """``folder`` read-only for every process: a read-only bind mount as root (root writes through file modes),
    else the write bits removed."""
    if os.geteuid() == 0:
        try:
            _mount("--bind", str(folder), str(folder))
            _mount("-o", "remount,bind,ro", str(folder))
        except (OSError, subprocess.CalledProcessError) as e:
            _unmount(folder)
            pytest.skip(f"cannot bind-mount {folder} read-only here ({e})")
        try:
            yield folder
        finally:
            _unmount(folder)
        return
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if not p.is_symlink()}
    for path, mode in modes.items():
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield folder
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "2m") mounted on ``folder``: a disk that fills up. Needs root; skips otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    try:
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    try:
        yield folder
    finally:
        _unmount(folder)
