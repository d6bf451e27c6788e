"""Evaluate stage: the branch model on the test split -> metrics, predictions and plots.

What is measured and written is the task's (Task.report_test, scored by Task.test_metric, the
same scoring path as the promotion gate and export parity):
classify  accuracy, top-k, per-class precision/recall/F1, confusion matrix
detect    COCO AP/AR (bbox, and segm for Mask R-CNN) with the evaluator's settings, the test
          split and predictions as COCO files, per-class PR curves, a class confusion matrix
segment   mIoU, per-class IoU, Dice, pixel accuracy, pixel confusion matrix, predicted masks
Every task draws a grid of test images with true and predicted labels, and a grid of the same
images with the class activation map of each prediction (figures/explain_grid.png, the maps in
figures/cams/, visionflow.evaluation.explain): the register stage logs them to MLflow with the
other figures, the inspect stage stores the maps as FiftyOne Heatmap fields. While the model
predicts, each test image's embedding (Task.embedding_module) is recorded into
reports/<task>/embeddings_test.npz, for the review stage's 2-D map in the FiftyOne App.
"""
from __future__ import annotations

import logging
from typing import Any

from visionflow.core.config import EvaluateParams
from visionflow.core.errors import DataError
from visionflow.manifest import read_categories, read_manifest, samples_in_split
from visionflow.core.paths import Paths
from visionflow.deploy.predictor import load_predictor
from visionflow.evaluation.explain import explain_test_grid
from visionflow.evaluation.review import EmbeddingRecorder, write_embeddings

log = logging.getLogger(__name__)


def evaluate(params: EvaluateParams, paths: Paths) -> dict[str, Any]:
    predictor = load_predictor(paths.model_dir)
    classes = predictor.meta["classes"]
    categories = read_categories(paths.categories)
    if [c.name for c in categories] != classes:
        raise DataError(paths.model_dir, f"model classes {classes} differ from {paths.categories} "
                        f"{[c.name for c in categories]}", hint="run the train stage again")
    test = samples_in_split(read_manifest(paths.manifest), paths.split_file, "test")
    if not test:
        raise DataError(paths.split_file, "the test split is empty: nothing to evaluate on",
                        hint="raise split.test or add images, then run split again")
    recorder = EmbeddingRecorder(*predictor.task.embedding_module(predictor.model))
    try:
        summary = predictor.task.report_test(params, paths, predictor, test, categories)
    finally:
        vectors = recorder.close()
    if len(vectors) != len(test):  # a task that ran its model more or less than once per image
        log.warning("embeddings: %d vectors for %d test images; none written (the review's 2-D map is skipped)",
                    len(vectors), len(test))
        vectors, test_ids = vectors[:0], []
    else:
        test_ids = [s.id for s in test]
    write_embeddings(paths.embeddings, test_ids, vectors)
    explain_test_grid(predictor, test, paths.root, paths.figures_dir, params.grid_images, params.score_threshold)
    return summary
