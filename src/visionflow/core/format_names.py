"""Annotation format names: importable without loading any format module (CLI start-up)."""
FORMATS = ("coco", "yolo", "voc", "imagefolder", "masks", "cvat", "labelstudio", "csv")
