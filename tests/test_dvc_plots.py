"""`dvc plots show` draws every plot the pipeline defines, offline (issue 15): each definition
names columns its file has (files written by the real stages), and the page DVC writes carries
vega, vega-lite and vega-embed inline (checked in headless Chromium with the network blocked)."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import browser, dump_dom  # noqa: E402
from project import REPO, TASKS, make_project  # noqa: E402

from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.evaluation.report import write_csv  # noqa: E402
from visionflow.integrations.dvc import build_dvc_yaml, check_generated, plot_templates, write_generated  # noqa: E402
from visionflow.integrations.dvc_plots import PAGE, TEMPLATES, VENDORED, page_setting, plot_files  # noqa: E402
from visionflow.stages import get_stage, pipeline_stages  # noqa: E402
from visionflow.tasks.detect import write_pr_curves  # noqa: E402
from visionflow.training.engine import write_history_csv  # noqa: E402

DVC = [sys.executable, "-m", "dvc"]
VEGA = REPO / "src/visionflow/integrations/vega"

# Injected after <body> of a copy of the page: wraps vegaEmbed (the call DVC writes in each plot's
# div) and records on the div how many scene items its data marks drew and how many non-empty
# line marks (one per series) it has. Without vega-embed the div says so.
PROBE = """<script>
window.vegaEmbed = (function (embed) {
  return function (selector, spec, options) {
    var div = document.querySelector(selector);
    if (typeof embed !== "function") { div.setAttribute("data-probe", "no vega-embed"); return; }
    return embed(selector, spec, options).then(function (result) {
      var items = 0, lines = 0;
      (function walk(mark) {
        var data = mark.role === "mark" && mark.marktype !== "group";
        if (data && mark.marktype === "line" && (mark.items || []).length) { lines += 1; }
        (mark.items || []).forEach(function (item) {
          if (data) { items += 1; }
          (item.items || []).forEach(walk);
        });
      })(result.view.scenegraph().root);
      div.setAttribute("data-items", items);
      div.setAttribute("data-lines", lines);
    }, function (error) { div.setAttribute("data-probe", "error: " + error); });
  };
})(window.vegaEmbed);
</script>"""


def _run(cmd, cwd) -> str:
    """The command's stdout; it must succeed."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _dvc_init(root: Path) -> None:
    _run(["git", "init", "-q"], root)
    _run([*DVC, "init", "-q"], root)
    _run([*DVC, "config", "core.analytics", "false"], root)


def _columns(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def _named_fields(spec) -> set[str]:
    """Fields a Vega-Lite template names itself (not DVC's <DVC_METRIC_*> anchors, not DVC's `rev`)."""
    if isinstance(spec, list):
        return set().union(*map(_named_fields, spec)) if spec else set()
    if not isinstance(spec, dict):
        return set()
    own = {spec["field"]} if isinstance(spec.get("field"), str) and not spec["field"].startswith("<DVC_") else set()
    return (own | set().union(*map(_named_fields, spec.values()))) - {"rev"}


def _drawn(page: Path) -> dict[str, dict[str, str]]:
    """Plot div id -> what the probe recorded, after Chromium ran the page offline."""
    text = page.read_text(encoding="utf-8")
    body = text.rindex("<body>") + len("<body>")  # the page's own: the inlined scripts may hold the string too
    probed = page.with_name("probed.html")
    probed.write_text(text[:body] + "\n" + PROBE + text[body:], encoding="utf-8")
    dom = dump_dom(probed.as_uri(), offline=True)
    return {m.group(1): dict(re.findall(r'data-(\w+)="([^"]*)"', m.group(2)))
            for m in re.finditer(r'<div id="([^"]+)"([^>]*)>', dom)}


def _div_id(plot_path: str) -> str:  # dvc_render.base.Renderer.remove_special_chars
    return re.sub(r"[!@#$%^&*()\[\]{};,<>?\\/:.|`~=_+ ]", "_", plot_path)


def test_committed_plot_templates_and_page_are_generated():
    for rel, text in plot_files().items():
        assert (REPO / ".dvc" / rel).read_text(encoding="utf-8") == text, f".dvc/{rel} is stale: run `visionflow dvc-yaml`"
    assert page_setting((REPO / ".dvc/config").read_text()) == PAGE


def test_vendored_vega_is_the_pinned_build_with_its_licence_and_ships_in_the_package():
    tomllib = pytest.importorskip("tomllib")
    readme = (VEGA / "README.md").read_text()
    for package, version, name in VENDORED:
        assert f'="{version}"' in (VEGA / name).read_text(encoding="utf-8"), f"{name} is not {package} {version}"
        assert "Redistribution and use in source and binary forms" in (VEGA / f"LICENSE.{package}").read_text()
        assert f"{package}-{version}.tgz" in readme
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["visionflow.integrations"]
    shipped = {p for pattern in patterns for p in (VEGA.parent).glob(pattern)}
    assert shipped == set(VEGA.iterdir())


def test_page_setting_reads_what_dvc_config_writes():
    assert page_setting("[core]\n    analytics = false\n[plots]\n    html_template = plots/offline.html\n") == PAGE
    assert page_setting("[plots]\n    html_template = 'my plots/page.html'\n") == "my plots/page.html"
    assert page_setting("[core]\n    html_template = plots/offline.html\n") is None  # another section
    assert page_setting("") is None


def test_dvc_yaml_command_writes_the_templates_and_points_dvc_at_the_page(tmp_path):
    root = tmp_path / "proj"
    params, paths = load_params(make_project(root, tasks=("detect",))), Paths(root)
    assert write_generated(params, paths) == [root / "dvc.yaml"]  # no .dvc/ before `dvc init` (it would refuse)
    assert not (root / ".dvc").exists()
    _dvc_init(root)
    assert check_generated(params, paths) == [
        f"{root / '.dvc' / rel} is out of date with the stage table; run `visionflow dvc-yaml`" for rel in plot_files()
    ] + [f"{root / '.dvc/config'} does not set plots.html_template = {PAGE} (the offline page); run `visionflow dvc-yaml`"]
    written = write_generated(params, paths)
    assert {p.relative_to(root).as_posix() for p in written} == \
        {"dvc.yaml", ".dvc/config", *(f".dvc/{rel}" for rel in plot_files())}
    assert check_generated(params, paths) == []
    assert _run([*DVC, "config", "plots.html_template"], root).strip() == PAGE
    assert _run([*DVC, "config", "core.analytics"], root).strip() == "false"  # the rest of the config is kept
    assert root / ".dvc/config" not in write_generated(params, paths)  # already set: left alone


def test_dvc_plots_show_draws_every_plot_offline(tmp_path):
    """A classify and a detect branch's plot definitions on small files: DVC's own page draws
    nothing offline (the probe can fail), the page from .dvc/plots/offline.html draws them all,
    the PR curves one line per class."""
    if browser() is None:
        pytest.skip("no chromium on PATH")
    root = tmp_path / "proj"
    params, paths = load_params(make_project(root, tasks=("classify", "detect"))), Paths(root)
    _dvc_init(root)
    definitions = plot_templates(params, paths)
    (root / "dvc.yaml").write_text(json.dumps({"plots": definitions}))  # only the top-level plots
    for task, val in (("classify", "val_loss"), ("detect", "val_map50")):
        p = paths.for_task(task)
        write_history_csv(p.train_history, [{"epoch": e, "train_loss": 1 / e, val: 0.2 * e, "lr": 0.01, "seconds": 1.0}
                                            for e in (1, 2, 3)])
    write_csv(paths.for_task("classify").confusion_csv, ["actual", "predicted"],
              [["circle", "circle"], ["circle", "square"], ["square", "square"]])
    write_csv(paths.for_task("classify").per_class_csv, ["class", "precision", "recall", "f1", "support"],
              [["circle", 1.0, 0.5, 0.67, 2], ["square", 0.5, 1.0, 0.67, 1]])
    recall = [i / 10 for i in range(11)]
    write_pr_curves(paths.for_task("detect").pr_curve_csv, recall,
                    {"circle": [1 - 0.5 * r * r for r in recall], "square": [0.7 - 0.5 * r for r in recall]})
    write_csv(paths.for_task("detect").per_class_csv, ["class", "ap", "ap50"], [["circle", 0.8, 0.9], ["square", 0.5, 0.6]])

    for rel, text in plot_files().items():  # our plot templates (DVC fails without them), not yet the page
        if rel != PAGE:
            (root / ".dvc" / rel).parent.mkdir(exist_ok=True)
            (root / ".dvc" / rel).write_text(text)
    _run([*DVC, "plots", "show", "-o", "cdn"], root)  # DVC's own page: vega from a CDN
    write_generated(params, paths)  # what `visionflow dvc-yaml` writes under .dvc/ (and dvc.yaml: put back)
    (root / "dvc.yaml").write_text(json.dumps({"plots": definitions}))
    _run([*DVC, "plots", "show"], root)
    page = (root / "dvc_plots/index.html").read_text(encoding="utf-8")
    assert "<script src=" not in page and "cdn.jsdelivr" not in page

    ids = {_div_id(next(iter(d))) for d in definitions}
    assert len(ids) == 6
    cdn = _drawn(root / "cdn/index.html")
    assert {i: cdn[i] for i in ids} == {i: {"probe": "no vega-embed"} for i in ids}
    drawn = _drawn(root / "dvc_plots/index.html")
    assert set(drawn) == ids, drawn
    for div, probe in drawn.items():
        assert "probe" not in probe and int(probe["items"]) > 0, (div, probe)
    pr = drawn[_div_id(paths.rel(paths.for_task("detect").pr_curve_csv))]
    assert (pr["lines"], pr["items"]) == ("2", str(2 * len(recall)))  # one line per class, every point


def test_every_plot_definition_names_columns_of_the_file_the_stages_write(tmp_path):
    """Every task's branch (1 epoch on a tiny project) through the real train and evaluate
    stages; then each plot definition's fields are columns of its file, and `dvc plots show`
    reads every definition without an error."""
    root = tmp_path / "proj"
    params = load_params(make_project(root, {"synth": {"n": 24}}, name="plots", tasks=TASKS))
    paths = Paths(root)
    for name in ("synth", "ingest", "split", *(f"{s}-{t}" for t in TASKS for s in ("train", "evaluate"))):
        get_stage(name, params).run(params, paths)

    definitions = build_dvc_yaml(params, paths)["plots"]
    written = {paths.rel(p) for st in pipeline_stages(params) for p in st.plots(paths, params)}
    assert sorted(next(iter(d)) for d in definitions) == sorted(written)  # each plot file: one definition
    for plot in definitions:
        (rel, spec), = plot.items()
        fields = {spec["x"], *([spec["y"]] if isinstance(spec["y"], str) else spec["y"])}
        fields |= _named_fields(TEMPLATES.get(spec.get("template"), {}))  # e.g. linear_by_class's `class`
        columns = _columns(root / rel)
        assert fields <= set(columns), f"{rel}: plot fields {sorted(fields - set(columns))} not in its columns {columns}"

    _dvc_init(root)
    write_generated(params, paths)
    shown = json.loads(_run([*DVC, "plots", "show", "--json"], root))
    assert shown.get("errors", []) == [], shown["errors"]  # e.g. "could not find provided field"
    assert set(shown["data"]) == written  # the definitions only: no stage output drawn a second time
    for rel, rendered in shown["data"].items():
        assert rendered and rendered[0]["type"] == "vega", (rel, rendered)
