"""A tiny project ready for `visionflow annotate`: the shapes rendered, ingested from their COCO file
and split by the real stages; the evaluate stage's predictions and the review's ranking written by
hand (both stages have their own tests), so the loop's tests know which samples are sent first."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from visionflow.core.config import load_params
from visionflow.core.files import write_json
from visionflow.core.paths import Paths
from visionflow.manifest import read_categories, read_manifest, samples_in_split
from visionflow.stages import get_stage

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402


def relabel_project(root: Path) -> tuple[Path, Paths]:
    params_file = make_project(root, {"synth": {"n": 30, "size": 64}}, name="relabel", tasks=("classify", "detect"))
    params = load_params(params_file)
    paths = Paths(root)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    test = samples_in_split(read_manifest(paths.manifest), paths.split_file, "test")
    k = len(read_categories(paths.categories))
    for task in ("classify", "detect"):
        p = paths.for_task(task)
        p.predictions.parent.mkdir(parents=True, exist_ok=True)
        records, rows = [], []
        for n, s in enumerate(test):
            if task == "classify":
                wrong = (s.labels[0] + 1) % k  # the model disagrees with every label: all worth a look
                probs = [0.05] * k
                probs[wrong] = 1 - 0.05 * (k - 1)
                records.append({"id": s.id, "label": wrong, "confidence": probs[wrong], "probs": probs,
                                "true": s.labels[0]})
            else:  # the first box found, shifted by 3 px; the others missed
                i = s.instances[0]
                records.append({"id": s.id, "boxes": [[v + 3 for v in i.bbox]], "labels": [i.category_id],
                                "scores": [0.9]})
            names = {c.id: c.name for c in read_categories(paths.categories)}
            reason = (f"labelled {names[s.labels[0]]}; the model says {names[records[-1]['label']]} "
                      f"({records[-1]['probs'][records[-1]['label']]:.0%})" if task == "classify"
                      else "missed boxes")
            rows.append({"id": s.id, "path": s.path, "score": round(1 - n / 100, 6), "reason": reason,
                         "signals": {}, "rank": n + 1})
        p.predictions.write_text("".join(json.dumps(r) + "\n" for r in records))
        write_json(p.review, {"task": task, "split": "test", "dataset": "none", "ranked_by": "own", "top": 5,
                              "samples": rows})
    return params_file, paths
