"""Exact and near-duplicate detection on images generated with Pillow in tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from visionflow.manifest.dedup import UnionFind, find_duplicates, near_pairs, phash
from visionflow.manifest import Sample


def smooth_image(seed: int, side: int = 64, base: int = 10) -> Image.Image:
    """A random smooth colour image: random base x base pixels upsampled (bicubic)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (base, base, 3), dtype=np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC)


def as_sample(root: Path, name: str, sha: str = "") -> Sample:
    return Sample(id=f"src/{name}", root=str(root), path=name, width=64, height=64, sha256=sha or name.ljust(64, "0"))


def popcount(x: int) -> int:
    return bin(x).count("1")


@pytest.fixture
def copies(tmp_path) -> Path:
    """orig.png, a re-encoded JPEG, a brightened copy, a half-size copy and a different image."""
    im = smooth_image(1, side=128, base=12)
    im.save(tmp_path / "orig.png")
    im.save(tmp_path / "reencoded.jpg", quality=70)
    ImageEnhance.Brightness(im).enhance(1.1).save(tmp_path / "bright.png")
    im.resize((64, 64), Image.Resampling.LANCZOS).save(tmp_path / "small.jpg", quality=90)
    smooth_image(2, side=128, base=12).save(tmp_path / "other.png")
    return tmp_path


def test_phash_is_close_for_copies_and_far_for_a_different_image(copies):
    h = {p.stem: phash(p) for p in copies.iterdir()}
    for name in ("reencoded", "bright", "small"):
        assert popcount(h["orig"] ^ h[name]) <= 4, name
    assert popcount(h["orig"] ^ h["other"]) > 12


def test_find_duplicates_clusters_exact_and_near_with_reasons(copies):
    samples = [as_sample(copies, p.name) for p in sorted(copies.iterdir())]
    orig = next(s for s in samples if s.path == "orig.png")
    samples.append(as_sample(copies, "orig.png", sha=orig.sha256))  # same bytes as orig.png
    samples[-1].id = "src/copy-of-orig.png"
    d = find_duplicates(samples, threshold=4)
    assert d.clusters == [["src/bright.png", "src/copy-of-orig.png", "src/orig.png", "src/reencoded.jpg",
                           "src/small.jpg"]]
    exact = [(p.a, p.b) for p in d.pairs if p.reason == "exact"]
    assert exact == [("src/copy-of-orig.png", "src/orig.png")]
    near = {frozenset((p.a, p.b)) for p in d.pairs if p.reason == "near"}
    assert all("src/other.png" not in pair for pair in near)
    assert all(p.distance <= 4 for p in d.pairs)
    summary = d.summary()
    assert summary["exact_pairs"] == 1 and summary["near_pairs"] == len(near) >= 3
    assert {e["reason"] for e in summary["examples"]} == {"exact", "near"}


def test_near_search_off_reads_no_image(tmp_path):
    # root does not exist: with the threshold off only sha256 is compared
    samples = [as_sample(tmp_path / "missing", "a.png", "1" * 64), as_sample(tmp_path / "missing", "b.png", "1" * 64)]
    for threshold in (None, 0):
        d = find_duplicates(samples, threshold=threshold)
        assert d.clusters == [["src/a.png", "src/b.png"]] and d.unhashed == [] and d.summary()["near_threshold"] is None


def test_unreadable_image_is_counted_not_fatal(copies):
    (copies / "broken.jpg").write_bytes(b"not an image")
    samples = [as_sample(copies, "orig.png"), as_sample(copies, "broken.jpg"), as_sample(copies, "gone.png")]
    d = find_duplicates(samples, threshold=4)
    assert d.unhashed == ["src/broken.jpg", "src/gone.png"] and d.summary()["unhashed"] == 2


def test_near_pairs_equals_brute_force_across_blocks():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 1500, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 1500, dtype=np.uint64)
    for i in range(0, 1400, 100):  # plant neighbours 1-3 bits away, across block borders too
        h[i + 90] = h[i] ^ np.uint64((1 << (i % 60)) | (1 << 61))
    found = {(i, j) for i, j, _ in near_pairs(h, 3)}
    brute = {(i, j) for i in range(len(h)) for j in np.nonzero(np.bitwise_count(h[i] ^ h[i + 1:]) <= 3)[0] + i + 1}
    assert found == {(i, j) for i, j in brute} and len(found) >= 14
    assert all(d == popcount(int(h[i]) ^ int(h[j])) for i, j, d in near_pairs(h, 3))


def test_near_duplicate_search_scales_to_thousands_of_images(tmp_path):
    n, planted = 2000, range(0, 2000, 100)
    samples = []
    for i in range(n):
        smooth_image(i).save(tmp_path / f"{i:04d}.bmp")  # BMP: no compression, fast to write
        samples.append(as_sample(tmp_path, f"{i:04d}.bmp"))
    for i in planted:  # brightened JPEG copies of 20 images
        ImageEnhance.Brightness(Image.open(tmp_path / f"{i:04d}.bmp")).enhance(1.05).save(
            tmp_path / f"copy{i:04d}.jpg", quality=90)
        samples.append(as_sample(tmp_path, f"copy{i:04d}.jpg"))
    d = find_duplicates(samples, threshold=4)
    assert sorted(d.clusters) == sorted([f"src/{i:04d}.bmp", f"src/copy{i:04d}.jpg"] for i in planted)


def test_union_find_components_are_named_by_smallest_member():
    uf = UnionFind(["d", "c", "b", "a", "e"])
    uf.union("d", "b")
    uf.union("c", "d")
    uf.union("e", "e")
    assert uf.components() == {"a": ["a"], "b": ["b", "c", "d"], "e": ["e"]}
