"""ImageFolder classification trees (torchvision / Keras layout) <-> canonical samples.

Layout (one folder per class; the folder name is the class name):

    images_root/
        classes.txt                 optional: class names, one per line, in id order
        <class>/<file>              flat layout, or
        train/<class>/<file>        split layout: every top-level folder is a split folder,
        val/<class>/<file>            `train`, `val`/`valid`/`validation` or `test` (any case)
        test/<class>/<file>

Reading maps:
    folder `<class>`               -> Category; ids 0..K-1 in classes.txt order, else sorted by name
    file                           -> Sample.path (POSIX, relative to images_root, split folder
                                      included); labels [class id]; no instances; group = id
    split folder                   -> Sample.attributes["split"] in {"train", "val", "test"}
    `<class>/<sub>/.../<file>`     -> nested folders belong to the TOP class folder (datasets
                                      often group a class by date or source); the path keeps them
`annotations` is the images root itself or a class list file (`classes.txt`); given the root,
`images_root/classes.txt` is used when it exists (the writer writes one, so order round-trips).
The tree is read in sorted order, so the result does not depend on the file system.

Which layout: split layout when every top-level folder is a split name, unless classes.txt lists
them (then they are classes named "train"/"test"); a mix of split and other folders is an error.

Validation policy (errors stop the read; counted problems are skipped and reported):

| problem                                             | policy                                        |
|-----------------------------------------------------|-----------------------------------------------|
| images root or class list missing, no class folder  | DataError naming the path                     |
| class list: duplicate or empty-after-strip name     | DataError naming the file and line            |
| class folder not listed in classes.txt              | DataError naming the folder and classes.txt   |
| split folders mixed with other top-level folders    | DataError naming the folders                  |
| file or folder symlink resolving outside the root,  | DataError naming the file                     |
|   or a symlink loop                                 |   (paths must stay inside the dataset root)   |
| non_image_skipped: no image extension, or a hidden  | file skipped, counted; left untouched         |
|   file (README, .DS_Store, Thumbs.db, ._x.jpg)      |                                               |
| image_outside_class: image directly in the root or  | image skipped, counted (it has no class)      |
|   in a split folder                                 |                                               |
| image_unreadable: corrupt / truncated image file    | image skipped, counted; the file is untouched |
| hidden folder (.git, .ipynb_checkpoints)            | skipped, not counted (never data)             |
| empty class folder                                  | class kept (no samples)                       |

Writing: `out_dir/[split/]<class>/<file name>` plus `out_dir/classes.txt`; see `write_imagefolder`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

from visionflow.core.errors import DataError
from visionflow.formats import COMMON_POLICIES, copy_file, ConversionReport, FormatResult, check_inside, probe
from visionflow.core.files import write_text
from visionflow.manifest import SPLIT_FOLDERS, Category, Sample, image_label

CLASSES_FILE = "classes.txt"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm"})

READ_POLICIES: dict[str, str] = {
    **COMMON_POLICIES,
    "non_image_skipped": "file skipped (no image extension, or hidden like .DS_Store); left untouched",
    "image_outside_class": "image skipped: it lies directly in the root or a split folder, not in a class folder",
}
WRITE_POLICIES: dict[str, str] = {
    "instances_dropped": "instance (box, polygons, mask) not written: ImageFolder holds one class per image",
    "label_from_instances": "image without a label written under the class of its largest non-crowd instance",
    "unlabelled_skipped": "image not written: it has no label and no instance to take a class from",
    "extra_labels_dropped": "image written under its first label only; the other labels are lost",
    "class_name_sanitised": "class folder renamed (characters a file system refuses, or a clash); "
                            "classes.txt holds the folder name, so the category is renamed on reading back",
    "file_renamed": "file name already used in its class folder: renamed <stem>_<sha256 prefix><ext>",
    "split_dropped": "split not written: not every sample has a train/val/test split, so the tree is flat",
    "attributes_dropped": "sample attributes (other than split) are not written",
    "group_dropped": "sample group is not written (ImageFolder has no grouping)",
}


# --- reading ---------------------------------------------------------------------------------

def read_imagefolder(images_root: Path, annotations: Optional[Path], source: str,
                     root: Optional[str] = None) -> FormatResult:
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise DataError(images_root, "images root is not a folder", hint="check ingest.sources[].images")
    listed, classes_file = _class_list(images_root, annotations)
    top = _subdirs(images_root, images_root, [])
    split_dirs = _split_dirs(images_root, top, listed)
    report = ConversionReport(READ_POLICIES)
    root = images_root.as_posix() if root is None else root

    # (class name, rel path, split) for every image, in sorted order.
    found: list[tuple[str, str, Optional[str]]] = []
    class_names: set[str] = set()
    bases = [images_root] + [images_root / d for d, _ in split_dirs if d]
    for base in bases:  # the root and any split folder hold class folders, never images
        for name in _loose_files(images_root, base, classes_file, report):
            report.add("image_outside_class", f"{images_root / name}: not inside a class folder")
    for split_dir, split in split_dirs:
        base = images_root / split_dir if split_dir else images_root
        for class_dir in _subdirs(images_root, base, []):
            class_names.add(class_dir.name)
            for rel in _walk(images_root, class_dir, [images_root.resolve()], report):
                found.append((class_dir.name, rel, split))

    categories = _categories(class_names, listed, classes_file, images_root, source)
    ids = {c.name: c.id for c in categories}
    samples = []
    for class_name, rel, split in found:
        probed = probe(images_root / rel, (None, None), report, f"{images_root} {rel}")
        if probed is None:
            continue
        width, height, sha = probed
        sid = f"{source}/{rel}"
        samples.append(Sample(id=sid, root=root, path=rel, width=width, height=height, sha256=sha,
                              labels=[ids[class_name]], group=sid,
                              attributes={"split": split} if split else {}))
    return FormatResult(categories, samples, report)


def _class_list(images_root: Path, annotations: Optional[Path]) -> tuple[Optional[list[str]], Optional[Path]]:
    """(class names in id order, the file they came from), or (None, None) when there is none."""
    if annotations is None or Path(annotations).is_dir():
        if annotations is not None and Path(annotations).resolve() != images_root.resolve():
            raise DataError(annotations, f"for imagefolder, annotations is the images root ({images_root}) "
                                         f"or a {CLASSES_FILE} file", hint="check ingest.sources[].annotations")
        path = images_root / CLASSES_FILE
        if not path.is_file():
            return None, None
    else:
        path = Path(annotations)
        if not path.is_file():
            raise DataError(path, "class list not found", hint="check ingest.sources[].annotations")
    names: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            continue  # blank lines (a trailing newline) carry nothing
        if name in names:
            raise DataError(path, f"class {name!r} listed twice", record=f"line {lineno}")
        names.append(name)
    return names, path


def _split_dirs(images_root: Path, top: list[Path], listed: Optional[list[str]]) -> list[tuple[str, Optional[str]]]:
    """[(split folder name or "", normalised split or None)]: where the class folders are."""
    names = [d.name for d in top]
    splits = [n for n in names if n.lower() in SPLIT_FOLDERS]
    if not splits or (listed is not None and all(n in listed for n in splits)):
        return [("", None)]
    if len(splits) == len(names):
        return [(n, SPLIT_FOLDERS[n.lower()]) for n in splits]
    others = [n for n in names if n not in splits]
    raise DataError(images_root, f"top-level folders mix split folders {splits} with other folders {others}",
                    hint=f"put every class under a split folder, or list the classes in {CLASSES_FILE}")


def _subdirs(images_root: Path, folder: Path, chain: list[Path]) -> list[Path]:
    """Non-hidden sub-folders, sorted; symlinked ones must stay inside the root."""
    out = []
    for p in sorted(folder.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or not p.is_dir():
            continue
        rel = p.relative_to(images_root).as_posix()
        _check(images_root, rel)
        if p.resolve() in chain:
            raise DataError(p, "symlink loop: the folder links back to one that contains it",
                            hint="remove the link")
        out.append(p)
    return out


def _walk(images_root: Path, folder: Path, chain: list[Path], report: ConversionReport) -> list[str]:
    """Relative paths of the images under a class folder (nested folders included), sorted."""
    chain = chain + [folder.resolve()]
    rels = _loose_files(images_root, folder, None, report)
    for sub in _subdirs(images_root, folder, chain):
        rels.extend(_walk(images_root, sub, chain, report))
    return rels


def _loose_files(images_root: Path, folder: Path, classes_file: Optional[Path],
                 report: ConversionReport) -> list[str]:
    """Image files directly in `folder`; other files are counted as non-images."""
    rels = []
    with os.scandir(folder) as it:  # DirEntry caches the file type: no stat per file
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        p = folder / entry.name
        if entry.is_dir() or (classes_file is not None and p == classes_file):
            continue
        rel = p.relative_to(images_root).as_posix()
        # `folder` was checked already, so only a symlink can lead outside the root; checking
        # just those halves the time to read a 70,000-image tree.
        if entry.is_symlink():
            _check(images_root, rel)
        # Hidden files are never images, whatever their extension (macOS "._x.jpg" forks).
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
            report.add("non_image_skipped", f"{p}: not an image file")
        else:
            rels.append(rel)
    return rels


def _check(images_root: Path, rel: str) -> None:
    try:
        check_inside(images_root, rel)
    except ValueError as exc:
        raise DataError(images_root / rel, str(exc), hint="paths must stay inside the dataset root") from None


def _categories(class_names: set[str], listed: Optional[list[str]], classes_file: Optional[Path],
                images_root: Path, source: str) -> list[Category]:
    if listed is None:
        order = sorted(class_names)
    else:
        missing = sorted(class_names - set(listed))
        if missing:
            raise DataError(classes_file, f"class folders {missing} are not listed",
                            hint=f"add them to {classes_file} or remove the folders")
        order = listed
    if not order:
        raise DataError(images_root, "no class folders found",
                        hint="an ImageFolder tree has one sub-folder per class: <root>/<class>/<image>")
    return [Category(id=i, name=n, source_ids={source: i}) for i, n in enumerate(order)]


# --- writing ---------------------------------------------------------------------------------

def write_imagefolder(samples: Iterable[Sample], categories: list[Category], out_dir: Path,
                      project_root: Path = Path("."), copy_images: bool = True,
                      report: Optional[ConversionReport] = None) -> Path:
    """Copy each image to `out_dir/[split/]<class>/<file name>`; write `out_dir/classes.txt`.

    The class of an image is `manifest.image_label` (its first label, else its largest
    instance's category). The split layout is used only when every written sample has a
    train/val/test `attributes["split"]`. Nested source folders are flattened: only the file
    name is kept. Everything the tree cannot hold is counted in `report` (WRITE_POLICIES).
    The folder is the annotation, so `copy_images=False` is refused. Returns classes.txt.
    """
    if not copy_images:
        raise ValueError("ImageFolder stores labels as folders: it cannot be written without copying the images")
    out_dir, project_root = Path(out_dir), Path(project_root)
    report = report if report is not None else ConversionReport()
    report.policies.update(WRITE_POLICIES)
    folders = _class_folders(categories, report)

    chosen = [(s, c) for s in samples if (c := _class_of(s, folders, report)) is not None]
    splits = [_split_of(s) for s, _ in chosen]
    use_splits = bool(chosen) and all(splits)
    used: set[str] = set()  # casefolded: "A.png" and "a.png" clash on macOS and Windows
    for (s, cid), split in zip(chosen, splits):
        if split and not use_splits:
            report.add("split_dropped", f"{s.id}: split {split!r}")
        folder = f"{split}/{folders[cid]}" if use_splits else folders[cid]
        dst = out_dir / folder / _free_name(s, folder, used, report)
        copy_file(s.image_path(project_root), dst, s.sha256)

    target = out_dir / CLASSES_FILE
    write_text(target, "".join(folders[c.id] + "\n" for c in categories))
    return target


def _class_folders(categories: list[Category], report: ConversionReport) -> dict[int, str]:
    """category id -> folder name, safe on every file system and unique ignoring case."""
    folders: dict[int, str] = {}
    taken: set[str] = set()
    for c in categories:
        name = _sanitise(c.name)
        if name.casefold() in taken:
            name = f"{name}_{c.id}"
        if name != c.name:
            report.add("class_name_sanitised", f"category {c.id} {c.name!r} -> folder {name!r}")
        taken.add(name.casefold())
        folders[c.id] = name
    return folders


_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[1-9]|lpt[1-9])(\..*)?$", re.IGNORECASE)


def _sanitise(name: str) -> str:
    # Leading dots would make the folder hidden (skipped by the reader); trailing dots and
    # spaces are stripped by Windows; the reserved device names cannot be folders there.
    safe = _UNSAFE.sub("_", name).strip().lstrip(".").rstrip(". ")
    safe = safe or "_"
    return f"{safe}_" if _RESERVED.match(safe) else safe


def _class_of(s: Sample, folders: dict[int, str], report: ConversionReport) -> Optional[int]:
    for _ in s.instances:
        report.add("instances_dropped", f"{s.id}: instance not written")
    if s.attributes.keys() - {"split"}:
        report.add("attributes_dropped", f"{s.id}: {sorted(s.attributes.keys() - {'split'})}")
    if s.group and s.group != s.id:
        report.add("group_dropped", f"{s.id}: group {s.group!r}")
    cid = image_label(s)
    if cid is None:
        report.add("unlabelled_skipped", f"{s.id}: no label")
        return None
    if not s.labels:
        report.add("label_from_instances", f"{s.id}: class {cid} from its largest instance")
    elif len(s.labels) > 1:
        report.add("extra_labels_dropped", f"{s.id}: labels {s.labels}, written under {cid}")
    if cid not in folders:
        raise ValueError(f"sample {s.id} has category id {cid}, which is not in the category table")
    return cid


def _split_of(s: Sample) -> Optional[str]:
    split = s.attributes.get("split")
    return SPLIT_FOLDERS.get(split.lower()) if isinstance(split, str) else None


def _free_name(s: Sample, folder: str, used: set[str], report: ConversionReport) -> str:
    name = Path(s.path).name
    if f"{folder}/{name}".casefold() in used:
        stem, ext = os.path.splitext(name)
        renamed, n = f"{stem}_{s.sha256[:8]}{ext}", 1
        while f"{folder}/{renamed}".casefold() in used:  # the same image twice: number it
            renamed, n = f"{stem}_{s.sha256[:8]}_{n}{ext}", n + 1
        report.add("file_renamed", f"{s.id}: {folder}/{name} taken, written as {folder}/{renamed}")
        name = renamed
    used.add(f"{folder}/{name}".casefold())
    return name

