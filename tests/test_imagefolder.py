"""ImageFolder reader/writer on tiny class trees generated in tmp_path."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.formats import ConversionReport
from visionflow.manifest.images import sha256_file
from visionflow.formats.imagefolder import READ_POLICIES, WRITE_POLICIES, read_imagefolder, write_imagefolder
from visionflow.manifest import Category, Instance, Sample


def make_image(path: Path, size=(32, 24), color=(200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def kaggle_tree(root: Path) -> Path:
    """What a Kaggle / Roboflow "folder" export looks like: split folders (`valid`), class
    folders, JPEGs named by the tool, plus the junk that comes with a zip made on a Mac or
    Windows: README, .DS_Store, Thumbs.db, AppleDouble `._x.jpg`, `.ipynb_checkpoints`."""
    make_image(root / "train/cat/cat.1.jpg", color=(10, 10, 10))
    make_image(root / "train/cat/cat.2.jpg", color=(20, 20, 20))
    make_image(root / "train/dog/dog.1.jpg", color=(30, 30, 30))
    make_image(root / "train/dog/sub/dog.9.png", color=(35, 35, 35))  # nested: class is "dog"
    make_image(root / "valid/cat/cat.3.JPG", color=(40, 40, 40))
    make_image(root / "test/dog/dog.2.jpeg", color=(50, 50, 50))
    (root / "test/bird").mkdir(parents=True)  # empty class folder: class kept
    (root / "README.dataset.txt").write_text("exported by a tool\n")
    (root / "train/cat/.DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train/dog/Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "train/dog/._dog.1.jpg").write_bytes(b"\0\5\x16\7")
    make_image(root / "train/cat/.ipynb_checkpoints/cat.1-checkpoint.jpg")  # hidden folder: ignored
    return root


def by_path(result) -> dict:
    return {s.path: s for s in result.samples}


# --- reading -------------------------------------------------------------------------------

def test_read_split_tree_like_a_real_export(tmp_path):
    root = kaggle_tree(tmp_path / "ds")
    res = read_imagefolder(root, root, "pets")
    assert [(c.id, c.name, c.source_ids) for c in res.categories] == [
        (0, "bird", {"pets": 0}), (1, "cat", {"pets": 1}), (2, "dog", {"pets": 2})]  # sorted by name
    assert [s.path for s in res.samples] == [  # sorted: test, train, valid
        "test/dog/dog.2.jpeg", "train/cat/cat.1.jpg", "train/cat/cat.2.jpg", "train/dog/dog.1.jpg",
        "train/dog/sub/dog.9.png", "valid/cat/cat.3.JPG"]
    s = by_path(res)
    assert [s[p].labels for p in s] == [[2], [1], [1], [2], [2], [1]]
    assert [s[p].attributes["split"] for p in s] == ["test", "train", "train", "train", "train", "val"]
    a = s["train/cat/cat.1.jpg"]
    assert a.id == "pets/train/cat/cat.1.jpg" and a.group == a.id and a.root == root.as_posix()
    assert (a.width, a.height, a.sha256) == (32, 24, sha256_file(root / a.path)) and a.instances == []
    assert res.report.counts == {"non_image_skipped": 4}  # README, .DS_Store, Thumbs.db, ._dog.1.jpg
    assert any("Thumbs.db" in e for e in res.report.examples["non_image_skipped"])


def test_read_flat_tree_with_class_list_order(tmp_path):
    root = tmp_path / "flat"
    for name in ("zebra", "ant", "moth"):
        make_image(root / name / f"{name}.png")
    (root / "empty").mkdir()
    sorted_res = read_imagefolder(root, root, "s", root="data/flat")
    assert [c.name for c in sorted_res.categories] == ["ant", "empty", "moth", "zebra"]
    assert {x.root for x in sorted_res.samples} == {"data/flat"}
    assert all("split" not in x.attributes for x in sorted_res.samples)

    order = tmp_path / "classes.txt"
    order.write_text("zebra\n  moth \n\nant\nempty\nunused\n")  # stripped, blanks skipped, extra kept
    res = read_imagefolder(root, order, "s")
    assert [c.name for c in res.categories] == ["zebra", "moth", "ant", "empty", "unused"]
    assert {x.path: x.labels for x in res.samples} == {"ant/ant.png": [2], "moth/moth.png": [1],
                                                       "zebra/zebra.png": [0]}
    (root / "classes.txt").write_text(order.read_text())  # inside the root: used, and not a stray file
    again = read_imagefolder(root, root, "s")
    assert [c.name for c in again.categories] == [c.name for c in res.categories]
    assert again.report.total == 0


def test_classes_named_like_splits(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "train/a.png")
    make_image(root / "test/b.png")
    # Without a class list, these are split folders holding loose images (no class).
    with pytest.raises(DataError, match="no class folders"):
        read_imagefolder(root, root, "s")
    (root / "classes.txt").write_text("test\ntrain\n")  # listed: they are classes
    res = read_imagefolder(root, root, "s")
    assert {x.path: x.labels for x in res.samples} == {"test/b.png": [0], "train/a.png": [1]}


def test_counted_problems(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "train/cat/ok.png")
    (root / "train/cat/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    make_image(root / "train/loose.png")  # in a split folder, not a class folder
    make_image(tmp_path / "flat/loose.jpg")
    make_image(tmp_path / "flat/cls/x.jpg")
    res = read_imagefolder(root, root, "s")
    assert [x.path for x in res.samples] == ["train/cat/ok.png"]
    assert res.report.counts == {"image_unreadable": 1, "image_outside_class": 1}
    assert "broken.png" in res.report.examples["image_unreadable"][0]
    assert "train/loose.png" in res.report.examples["image_outside_class"][0]
    flat = read_imagefolder(tmp_path / "flat", tmp_path / "flat", "f")
    assert flat.report.counts == {"image_outside_class": 1} and len(flat.samples) == 1


def test_errors_name_the_file(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "cat/a.png")
    make_image(root / "dog/b.png")
    with pytest.raises(DataError, match=r"nowhere: images root is not a folder"):
        read_imagefolder(tmp_path / "nowhere", tmp_path / "nowhere", "s")
    with pytest.raises(DataError, match=r"missing\.txt: class list not found"):
        read_imagefolder(root, tmp_path / "missing.txt", "s")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(DataError, match=r"other: for imagefolder, annotations is the images root"):
        read_imagefolder(root, other, "s")

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match=r"classes\.txt \[line 3\]: class 'cat' listed twice"):
        read_imagefolder(root, classes, "s")
    classes.write_text("cat\n")
    with pytest.raises(DataError, match=r"classes\.txt: class folders \['dog'\] are not listed"):
        read_imagefolder(root, classes, "s")

    make_image(root / "train/cat/c.png")
    with pytest.raises(DataError, match=r"ds: top-level folders mix split folders \['train'\] with other "
                                        r"folders \['cat', 'dog'\]"):
        read_imagefolder(root, root, "s")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    with pytest.raises(DataError, match=r"empty: no class folders found"):
        read_imagefolder(empty, empty, "s")


def test_symlinks_outside_the_root_are_refused(tmp_path):
    outside = make_image(tmp_path / "secret/x.png")
    root = tmp_path / "ds"
    make_image(root / "cat/a.png")
    os.symlink(outside, root / "cat/link.png")
    with pytest.raises(DataError, match=r"cat/link\.png: .*resolves outside the images root"):
        read_imagefolder(root, root, "s")
    (root / "cat/link.png").unlink()
    os.symlink(tmp_path / "secret", root / "dog")  # a whole class folder pointing outside
    with pytest.raises(DataError, match=r"ds/dog: .*resolves outside the images root"):
        read_imagefolder(root, root, "s")
    (root / "dog").unlink()
    os.symlink(root / "cat", root / "cat/again")  # loop
    with pytest.raises(DataError, match=r"cat/again: symlink loop"):
        read_imagefolder(root, root, "s")
    (root / "cat/again").unlink()
    os.symlink(root / "cat", root / "kitty")  # inside the root: allowed, read as its own class
    res = read_imagefolder(root, root, "s")
    assert [(x.path, x.labels) for x in res.samples] == [("cat/a.png", [0]), ("kitty/a.png", [1])]


# --- writing -------------------------------------------------------------------------------

def test_round_trip_read_write_read(tmp_path):
    src = tmp_path / "in"
    for split, cls, name, color in [("train", "cat", "c1.jpg", 1), ("train", "dog", "d1.png", 2),
                                    ("val", "cat", "c2.jpg", 3), ("test", "dog", "d2.png", 4)]:
        make_image(src / split / cls / name, color=(color * 40, 0, 0))
    (src / "test/fish").mkdir(parents=True)
    (src / "classes.txt").write_text("dog\ncat\nfish\n")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}

    first = read_imagefolder(src, src, "s")
    report = ConversionReport()
    target = write_imagefolder(first.samples, first.categories, tmp_path / "out", report=report)
    assert target == tmp_path / "out/classes.txt" and target.read_text() == "dog\ncat\nfish\n"
    assert report.total == 0
    assert (tmp_path / "out/train/cat/c1.jpg").read_bytes() == (src / "train/cat/c1.jpg").read_bytes()
    second = read_imagefolder(tmp_path / "out", target, "s")
    assert [(c.id, c.name) for c in second.categories] == [(c.id, c.name) for c in first.categories]
    assert second.report.total == 0
    assert [(x.id, x.path, x.width, x.height, x.sha256, x.labels, x.attributes) for x in second.samples] == \
           [(x.id, x.path, x.width, x.height, x.sha256, x.labels, x.attributes) for x in first.samples]
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # source untouched
    # Writing again over the same folder changes nothing and counts nothing.
    write_imagefolder(second.samples, second.categories, tmp_path / "out", project_root=tmp_path)
    assert len(read_imagefolder(tmp_path / "out", tmp_path / "out", "s").samples) == 4


def sample(tmp_path: Path, path: str, labels: list[int], color=(0, 0, 0), **kw) -> Sample:
    img = make_image(tmp_path / "src" / path, color=color)
    return Sample(id=f"src/{path}", root=(tmp_path / "src").as_posix(), path=path, width=32, height=24,
                  sha256=sha256_file(img), labels=labels, **kw)


def test_writer_counts_what_the_tree_cannot_hold(tmp_path):
    cats = [Category(3, "Cat"), Category(7, "cat"), Category(9, "a/b: c?"), Category(11, ".hidden"),
            Category(12, "CON")]
    box = Instance(bbox=[1.0, 1.0, 9.0, 9.0], category_id=7, polygons=[[1, 1, 9, 1, 9, 9]])
    samples = [
        sample(tmp_path, "x/one.png", [3], (10, 0, 0), attributes={"split": "train", "camera": "a"}),
        sample(tmp_path, "y/one.png", [3], (20, 0, 0), group="session-1"),  # same name, same class
        sample(tmp_path, "two.png", [7, 9], (30, 0, 0), instances=[box]),
        sample(tmp_path, "three.png", [], (40, 0, 0), instances=[box, box]),  # class from instances
        sample(tmp_path, "four.png", [], (50, 0, 0)),  # nothing to classify by
        sample(tmp_path, "five.png", [9], (60, 0, 0)),
        sample(tmp_path, "six.png", [11], (70, 0, 0)),
    ]
    report = ConversionReport()
    out = tmp_path / "out"
    target = write_imagefolder(samples, cats, out, report=report)
    assert target.read_text().splitlines() == ["Cat", "cat_7", "a_b_ c_", "hidden", "CON_"]
    assert report.counts == {"class_name_sanitised": 4, "instances_dropped": 3, "extra_labels_dropped": 1,
                             "label_from_instances": 1, "unlabelled_skipped": 1, "file_renamed": 1,
                             "attributes_dropped": 1, "group_dropped": 1, "split_dropped": 1}
    assert set(report.policies) == set(WRITE_POLICIES)
    renamed = f"one_{samples[1].sha256[:8]}.png"
    assert any(renamed in e for e in report.examples["file_renamed"])

    back = read_imagefolder(out, target, "w")
    assert back.report.total == 0
    names = {c.id: c.name for c in back.categories}
    assert {x.path: names[x.labels[0]] for x in back.samples} == {
        "Cat/one.png": "Cat", f"Cat/{renamed}": "Cat", "cat_7/two.png": "cat_7", "cat_7/three.png": "cat_7",
        "a_b_ c_/five.png": "a_b_ c_", "hidden/six.png": "hidden"}
    assert (out / "Cat" / renamed).read_bytes() == (tmp_path / "src/y/one.png").read_bytes()


def test_writer_refuses_what_it_cannot_write(tmp_path):
    s = sample(tmp_path, "a.png", [5])
    with pytest.raises(ValueError, match="category id 5, which is not in the category table"):
        write_imagefolder([s], [Category(0, "x")], tmp_path / "out")
    with pytest.raises(ValueError, match="cannot be written without copying"):
        write_imagefolder([s], [Category(5, "x")], tmp_path / "out", copy_images=False)


def test_policies_are_declared():
    assert {"non_image_skipped", "image_outside_class", "image_unreadable"} <= set(READ_POLICIES)
