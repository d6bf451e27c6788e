"""Review stage: rank the test split by likely label mistakes (docs/review.md).

Inputs: the test predictions and embeddings (evaluate), the manifest, split and categories, and
the FiftyOne dataset the inspect stage wrote. Each labelled test sample gets the task's own
disagreement signal (Task.review_signal, visionflow.evaluation.review) and, where FiftyOne Brain
has one for the task (classification, detection), Brain's mistakenness; the larger is the
sample's review score. Outputs:

- reports/<task>/review.json: every sample, most likely mistake first: id, image path, score,
  reason, and the signals behind the score;
- metrics/<task>/review.json: how many were reviewed and how many score over 0.5;
- in the FiftyOne dataset: fields review_score, review_reason, review_rank (Brain's mistakenness
  and hardness beside them), the tag `review` on the top `review.top`, the saved view `review`
  (every sample, sorted by review_score) and a 2-D map of the embeddings (brain key
  `review_map`) in the App's Embeddings panel.

`visionflow annotate` sends the top of review.json to an annotation tool.
"""
from __future__ import annotations

import logging
from typing import Any

from visionflow.core.config import BranchParams, dataset_name
from visionflow.core.errors import UserError
from visionflow.core.files import write_json
from visionflow.core.paths import Paths
from visionflow.evaluation.review import ranked, read_embeddings
from visionflow.manifest import read_categories, read_manifest, samples_in_split
from visionflow.stages.inspect import read_predictions

log = logging.getLogger(__name__)


def review(branch: BranchParams, paths: Paths) -> dict[str, Any]:
    params, inspect = branch.review, branch.inspect
    if inspect.split != "test":
        raise UserError(f"{paths.task}.inspect.split is {inspect.split!r}: the review ranks the test split, the one "
                        "the evaluate stage predicted and the model never trained on; set inspect.split: test")
    from visionflow.tasks import get_task

    task = get_task(paths.task)
    categories = read_categories(paths.categories)
    names = [c.name for c in categories]
    test = samples_in_split(read_manifest(paths.manifest), paths.split_file, "test")
    predictions = read_predictions(paths.predictions, len(categories), paths.task)
    rows, unpredicted = [], 0
    for s in test:
        record = predictions.get(s.id)
        if record is None:
            unpredicted += 1
            continue
        signal = task.review_signal(s, record, names, params)
        rows.append({"id": s.id, "path": s.path, "score": round(float(signal.score), 6), "reason": signal.reason,
                     "signals": {"own": round(float(signal.score), 6), **signal.details}})
    if unpredicted:
        log.warning("review: %d test samples have no prediction (predictions_test.jsonl is older than the split); "
                    "re-run evaluate", unpredicted)
    if not rows:
        raise UserError(f"{paths.predictions}: no prediction for any of the {len(test)} test samples; "
                        f"re-run `visionflow stage evaluate-{paths.task}`")

    embeddings = read_embeddings(paths.embeddings) if paths.embeddings.exists() else {}
    from visionflow.integrations.fiftyone import write_review  # imports fiftyone

    name = dataset_name(paths.task, inspect)
    summary = write_review(name, rows, paths.task, brain=params.brain, visualization=params.visualization,
                           embeddings=embeddings, top=params.top)
    rows = ranked(rows)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    write_json(paths.review, {"task": paths.task, "split": "test", "dataset": name,
                              "ranked_by": summary["ranked_by"], "top": params.top, "samples": rows})
    flagged = sum(1 for r in rows if r["score"] > 0.5)
    write_json(paths.review_metrics, {"reviewed": len(rows), "score_over_0_5": flagged,
                                      "top_mean_score": round(sum(r["score"] for r in rows[:params.top])
                                                              / min(params.top, len(rows)), 6)})
    summary.update({"reviewed": len(rows), "score_over_0_5": flagged, "report": str(paths.review),
                    "worst": [{k: r[k] for k in ("id", "score", "reason")} for r in rows[:3]]})
    return summary
