"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A crash mid-write leaves the previous file intact, never a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _file_mode() -> int:
    # mkstemp creates 0600 files; outputs should get the mode a plain open() would (umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _file_mode())
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically produce `path` with `writer(tmp_path)` (e.g. torch.save, savefig)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (md5 is what DVC 3 records for a file)."""
    import hashlib

    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_dir(target: str | Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with `fill(tmp_dir)` next to `target`, then swap it in: readers see the
    old folder or the new one, never a half-written one."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


MAX_UNZIPPED = 64 * 2**30  # bytes: refuse archives that would expand beyond this (zip bombs)


def safe_extract_zip(archive: str | Path, dest: str | Path) -> Path:
    """Extract `archive` into `dest` (replaced atomically) and return `dest`.

    Every member must stay inside `dest`: absolute names, `..` components, drive letters and
    links are refused with the member named, before anything is written. An extraction of the
    same archive bytes is reused (dest/.visionflow-zip-sha256 records them)."""
    import shutil
    import stat
    import zipfile

    archive, dest = Path(archive), Path(dest)
    from visionflow.core.errors import DataError

    digest = file_digest(archive)
    marker = dest / ".visionflow-zip-sha256"
    if marker.exists() and marker.read_text().strip() == digest:
        return dest
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DataError(archive, f"not a readable zip archive ({exc})", hint="re-download or re-export it") from None
    with zf:
        total = 0
        for info in zf.infolist():
            name = info.filename.replace("\\", "/")
            parts = [p for p in name.split("/") if p not in ("", ".")]
            if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
                raise DataError(archive, f"member {info.filename!r} would land outside the extraction folder",
                                hint="the archive is unsafe; re-export it from the annotation tool")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(archive, f"member {info.filename!r} is a symbolic link",
                                hint="links are not extracted; re-export the archive without them")
            total += info.file_size
        if total > MAX_UNZIPPED:
            raise DataError(archive, f"expands to {total / 2**30:.1f} GiB, more than {MAX_UNZIPPED / 2**30:.0f} GiB",
                            hint="extract it yourself and give the folder as the source's path")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            zf.extractall(tmp)
            (tmp / marker.name).write_text(digest + "\n")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest
