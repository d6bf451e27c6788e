"""Multi-label CSV (Roboflow's Multi-Label Classification export): a real export read as
Roboflow wrote it, round trips through the writer, and refusals that name the file and line."""
import shutil
from pathlib import Path

import pytest

from visionflow.core.errors import DataError
from visionflow.formats import read_source, write_format
from visionflow.manifest import Category, Sample

REAL = Path(__file__).parent / "data" / "real" / "roboflow-skinproblem-multilabel"
CLASSES = ["Acne", "Blackheads", "Dark Spots", "Dry Skin", "Eye bags", "Normal Skin", "Oily Skin", "Pores",
           "Skin Redness", "Wrinkles"]
# The images the export holds and their rows, read by hand from <split>/_classes.csv.
EXPECTED = {
    "train/10_jpg.rf.340db6cb27bc81747ebd9574193f88dd.jpg": ["Blackheads"],
    "train/25_jpg.rf.eeb0573aea368aa6699a9f9d4748a402.jpg": ["Wrinkles"],
    "train/26_jpg.rf.eb38766f1d6ba6c488104e5a91964e04.jpg": ["Dark Spots"],
    "train/9bc0d52c-4c9e-4d61-8cd9-d020e86a22c4_jpg.rf.bfabd51afd937f3cc456f35789d1793b.jpg": ["Dark Spots"],
    "valid/10_jpeg_jpg.rf.5f58057c0d03d635858bd19c57a5a220.jpg": ["Wrinkles"],
    "valid/24_jpg.rf.606ed093bb23c47b9d416e0d82cb7257.jpg": ["Blackheads"],
    "valid/36-Male-South-Korean-Young-Kwang-Kim_jpg.rf.6000c01fdb4b4010869425b66dbabaf6.jpg": ["Normal Skin"],
    "test/101_jpg.rf.ffb91e580c891eb04b715545274b2469.jpg": ["Blackheads"],
    "test/252_jpeg_jpg.rf.fdb8e3a6b21d7ff3e7b5190c7d588778.jpg": ["Wrinkles"],
    "test/29-Male-South-Korean-Kang-Song_jpg.rf.fde9e1486ef1d8a180a7cb05d9397f22.jpg": ["Normal Skin"],
}
ROWS = 3378 + 969 + 481


def _names(result, sample):
    names = {c.id: c.name for c in result.categories}
    return [names[k] for k in sample.labels]


def test_real_roboflow_export_reads_as_written():
    result = read_source("csv", REAL, REAL, "skin")
    assert [c.name for c in result.categories] == CLASSES  # spaces after the commas stripped
    got = {s.path: _names(result, s) for s in result.samples}
    assert got == EXPECTED
    splits = {s.path: s.attributes["split"] for s in result.samples}
    assert sorted(set(splits.values())) == ["test", "train", "val"]  # valid -> val
    assert all(splits[p] == {"train": "train", "valid": "val", "test": "test"}[p.split("/")[0]] for p in splits)
    # the rows whose images the repository did not keep are skipped and counted, not fatal
    assert result.report.counts == {"image_missing": ROWS - len(EXPECTED)}
    assert all(s.width > 0 and s.height > 0 and len(s.sha256) == 64 for s in result.samples)


def test_a_row_with_several_classes(tmp_path):
    export = tmp_path / "export"
    shutil.copytree(REAL, export)
    # the train table's first row marks Acne and Pores; give it an image (a copy of another)
    shutil.copy(export / "train/10_jpg.rf.340db6cb27bc81747ebd9574193f88dd.jpg",
                export / "train/661_jpg.rf.0017f9b86015098adfd95ae4d958e94d.jpg")
    result = read_source("csv", export / "train", export / "train" / "_classes.csv", "skin")
    [multi] = [s for s in result.samples if s.path.startswith("661_")]
    assert _names(result, multi) == ["Acne", "Pores"] and "split" not in multi.attributes
    assert len(result.samples) == 5  # one table given: only the train folder's images


def test_round_trip_keeps_classes_and_splits(tmp_path):
    first = read_source("csv", REAL, REAL, "skin")
    out = tmp_path / "out"
    written = write_format("csv", first.samples, first.categories, out, project_root=Path("/"))
    assert written == out and sorted(p.name for p in out.iterdir()) == ["test", "train", "valid"]
    header = (out / "train" / "_classes.csv").read_text().splitlines()[0]
    assert header == "filename, " + ", ".join(CLASSES)  # Roboflow's own layout
    again = read_source("csv", out, out, "skin")
    assert {s.path: _names(again, s) for s in again.samples} == EXPECTED
    assert {s.sha256 for s in again.samples} == {s.sha256 for s in first.samples} and again.report.total == 0


def test_writer_counts_what_a_table_cannot_hold(tmp_path):
    from visionflow.formats import ConversionReport
    from visionflow.manifest import Instance

    image = tmp_path / "a.png"
    shutil.copy(next(REAL.glob("train/*.jpg")), image)
    s = Sample(id="x/a.png", root=str(tmp_path), path="a.png", width=1, height=1, sha256="", labels=[1],
               instances=[Instance(bbox=[0, 0, 1, 1], category_id=0)], attributes={"split": "train", "scene": 2})
    report = ConversionReport()
    target = write_format("csv", [s], [Category(0, "cat"), Category(1, "dog")], tmp_path / "out", Path("/"),
                          copy_images=False, report=report)
    assert target == tmp_path / "out"  # a split export: every sample has a split
    assert (tmp_path / "out/train/_classes.csv").read_text() == "filename, cat, dog\na.png, 0, 1\n"
    assert report.counts == {"instances_dropped": 1, "attributes_dropped": 1}


@pytest.mark.parametrize("table, error", [
    ("filename, a, b\nx.png, 1, 2\n", r"_classes.csv \[line 2\]: column 3 \('b'\) is '2', not 0 or 1"),
    ("filename, a, b\nx.png, 1\n", r"\[line 2\]: 2 cells, the header has 3"),
    ("filename, a, a\n", r"\[line 1\]: class 'a' is listed twice"),
    ("filename\n", r"\[line 1\]: the header names no class"),
    ("filename, a\n../x.png, 1\n", r"\[line 2\]: file name '../x.png' contains '..'"),
    ("filename, a\nx.png, 1\nx.png, 0\n", r"\[line 3\]: 'x.png' is listed twice"),
])
def test_bad_tables_are_refused_naming_file_and_line(tmp_path, table, error):
    (tmp_path / "_classes.csv").write_text(table)
    with pytest.raises(DataError, match=error):
        read_source("csv", tmp_path, tmp_path, "t")


def test_split_tables_must_agree_and_a_folder_without_tables_is_named(tmp_path):
    for split, header in (("train", "filename, a, b"), ("valid", "filename, a, c")):
        (tmp_path / split).mkdir()
        (tmp_path / split / "_classes.csv").write_text(header + "\n")
    with pytest.raises(DataError, match=r"valid/_classes.csv: its classes \['a', 'c'\] differ from .*train/_classes.csv"):
        read_source("csv", tmp_path, tmp_path, "t")
    with pytest.raises(DataError, match=r"empty: no _classes.csv here nor in a train/valid/test folder"):
        (tmp_path / "empty").mkdir()
        read_source("csv", tmp_path / "empty", tmp_path / "empty", "t")
