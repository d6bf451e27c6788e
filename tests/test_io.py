import os
import stat

import pytest

from visionflow.core.files import atomic_path, file_digest, write_dir, write_json, write_text


def test_atomic_write_replaces_and_keeps_the_umask_mode(tmp_path):
    target = tmp_path / "a" / "out.json"
    write_json(target, {"x": 1})
    write_text(target, "second\n")
    assert target.read_text() == "second\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failed_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_dir_swaps_whole_folders(tmp_path):
    target = tmp_path / "model"
    write_dir(target, lambda d: (d / "a").write_text("1"))
    write_dir(target, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]

    def boom(d):
        (d / "c").write_text("3")
        raise RuntimeError("crash")
    with pytest.raises(RuntimeError):
        write_dir(target, boom)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_file_digest(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert file_digest(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_digest(f, "md5") == "900150983cd24fb0d6963f7d28e17f72"
