"""dvc.yaml, the Prefect flow and the stage table must describe the same pipeline."""
import ast
import subprocess
import sys
from pathlib import Path

import yaml

from visionflow.core.config import Params, has_key, load_params
from visionflow.integrations.dvc import render
from visionflow.core.paths import Paths
from visionflow.stages import STAGES, pipeline_stages

REPO = Path(__file__).resolve().parents[1]


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_committed_dvc_yaml_is_generated_from_the_stage_table():
    assert (REPO / "dvc.yaml").read_text() == render(load_params(REPO / "params.yaml"), Paths(REPO)), \
        "dvc.yaml is stale: run `visionflow dvc-yaml`"


def test_dvc_yaml_and_stage_table_name_the_same_stages_in_order():
    names = [s.name for s in pipeline_stages(load_params(REPO / "params.yaml"))]
    assert list(_dvc()["stages"]) == names
    assert names[:3] == ["synth", "ingest", "split"]
    for task in load_params(REPO / "params.yaml").tasks:  # each task is its own branch
        assert [n for n in names if n.endswith(f"-{task}")] == \
            [f"{s}-{task}" for s in ("train", "evaluate", "register", "inspect", "review", "promote")]
    for name, entry in _dvc()["stages"].items():
        assert entry["cmd"] == f"visionflow stage {name}"


def test_branches_write_disjoint_outputs_and_models():
    outs: dict[str, str] = {}
    for name, entry in _dvc()["stages"].items():
        for key in ("outs", "metrics", "plots"):
            for out in entry.get(key, []):
                path = next(iter(out)) if isinstance(out, dict) else out
                assert path not in outs, f"{path} written by {outs.get(path)} and {name}"
                outs[path] = name
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    tasks = load_params(REPO / "params.yaml").tasks
    assert set(tasks) == {"classify", "detect", "segment", "multilabel"}  # the demo runs every task
    names = [raw[t]["register"]["model_name"] for t in tasks]
    assert len(set(names)) == len(tasks)


def test_every_dvc_param_key_exists_in_the_typed_config():
    for name, entry in _dvc()["stages"].items():
        assert entry["params"], name
        for key in entry["params"]:
            assert has_key(Params, key), f"dvc.yaml stage {name} tracks unknown param {key}"
            stage, _, task = name.partition("-")
            takes = {"promote": ("promote", "register"), "review": ("review", "inspect")}  # stages reading two sections
            sections = [f"{task}.{s}" for s in takes[stage]] if stage in takes else \
                [f"{task}.{stage}" if task else stage]
            assert any(key.startswith(s + ".") for s in sections), f"stage {name} tracks another stage's param {key}"


def test_params_yaml_spells_out_every_tracked_key():
    # DVC fails a stage whose tracked key is absent from params.yaml, defaults or not.
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for entry in _dvc()["stages"].values():
        for key in entry["params"]:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"params.yaml lacks {key}"
                node = node[part]


def test_every_stage_dep_is_produced_upstream_or_is_source():
    produced: set[str] = set()
    for name, entry in _dvc()["stages"].items():
        for dep in entry["deps"]:
            if dep.startswith("src/"):
                assert (REPO / dep).exists(), f"{name}: code dep {dep} does not exist"
                continue
            assert any(dep == o or dep.startswith(o + "/") for o in produced), f"{name}: {dep} is not produced upstream"
        for key in ("outs", "metrics", "plots"):
            for out in entry.get(key, []):
                produced.add(next(iter(out)) if isinstance(out, dict) else out)


def test_code_deps_are_every_module_the_stage_imports():
    """Soundness of the derived code deps: whatever importing a stage's modules really executes
    (checked in a fresh interpreter per root module) is a dvc.yaml dep of that stage."""
    from visionflow.integrations.codedeps import module_file

    stages = pipeline_stages(load_params(REPO / "params.yaml"))
    roots = sorted({r for st in stages for r in st.code_roots})
    probe = "import importlib, sys; importlib.import_module(sys.argv[1]); " \
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] == 'visionflow'))"
    loaded = {}
    for root in roots:
        out = subprocess.run([sys.executable, "-c", probe, root], capture_output=True, text=True, check=True)
        loaded[root] = {m for m in out.stdout.split() if module_file(m) is not None}
    dvc = _dvc()["stages"]
    for st in stages:
        deps = set(dvc[st.name]["deps"])
        for root in st.code_roots:
            files = {f"src/{module_file(m).relative_to(REPO / 'src').as_posix()}" for m in loaded[root]}
            assert files <= deps, f"{st.name}: imports {sorted(files - deps)} that dvc.yaml does not list"


def test_code_deps_follow_lazy_imports_and_skip_type_checking():
    from visionflow.integrations.codedeps import closure, direct_imports

    # the inspect stage imports FiftyOne's module inside its function (to keep the CLI fast)
    assert "visionflow.integrations.fiftyone" in direct_imports("visionflow.stages.inspect")
    # stages/__init__.py imports the config only under TYPE_CHECKING: that never runs
    assert "visionflow.core.config" not in direct_imports("visionflow.stages")
    # importing a submodule runs its packages' __init__ files first
    assert {"visionflow", "visionflow.tasks"} <= closure(["visionflow.tasks.detect"])
    # a branch depends on its own task's model code, not on another task's
    stages = {s.name: s for s in pipeline_stages(load_params(REPO / "params.yaml"))}
    dvc = _dvc()["stages"]
    assert "src/visionflow/models/detectors.py" in dvc["train-detect"]["deps"]
    assert "src/visionflow/models/detectors.py" not in dvc["train-segment"]["deps"]
    assert "src/visionflow/models/segmenters.py" not in dvc["train-classify"]["deps"]
    assert stages["train-detect"].code_roots == ["visionflow.stages.train", "visionflow.tasks.detect"]


def test_flow_runs_the_stage_table():
    # The flow holds no stage list of its own: it iterates visionflow.stages.pipeline_stages.
    tree = ast.parse((REPO / "flows/pipeline.py").read_text())
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For)]
    assert any(isinstance(l.iter, ast.Call) and getattr(l.iter.func, "id", None) == "pipeline_stages" for l in loops)
    assert all(s.load() for s in STAGES)  # every stage function imports


def test_dvc_yaml_check_command():
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", "dvc-yaml", "--check", "--params", str(REPO / "params.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_declared_format_has_a_reader_and_a_writer():
    from visionflow.core.format_names import FORMATS
    from visionflow.formats import READERS, WRITERS

    assert set(READERS) == set(WRITERS) == set(FORMATS)


def test_split_from_file_becomes_a_dvc_dependency(tmp_path):
    from visionflow.integrations.dvc import build_dvc_yaml

    params = load_params(REPO / "params.yaml")
    params = params.model_copy(update={"split": params.split.model_copy(update={"from_file": "splits/mine.csv"})})
    deps = build_dvc_yaml(params, Paths(tmp_path))["stages"]["split"]["deps"]
    assert "splits/mine.csv" in deps


def test_gitignore_keeps_what_dvc_caches_out_of_git_and_commits_the_small_outputs():
    """DVC's recommended layout: cached outputs are ignored by git (DVC versions them); metrics,
    plots and uncached reports are committed with dvc.lock, so experiments and commits compare."""
    cached, committed = [], []
    for name, entry in _dvc()["stages"].items():
        for out in entry.get("outs", []):
            (committed if isinstance(out, dict) and out[next(iter(out))].get("cache") is False else cached).append(
                next(iter(out)) if isinstance(out, dict) else out)
        for key in ("metrics", "plots"):
            committed += [next(iter(m)) for m in entry.get(key, [])]
    # a folder output is ignored when a file inside it is
    probe = [p + "/x" if not Path(p).suffix else p for p in cached + committed]
    res = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, input="\n".join(probe),
                         capture_output=True, text=True)
    ignored = set(res.stdout.split())
    assert not [p for p, q in zip(cached, probe) if q not in ignored], "cached DVC outputs git does not ignore"
    assert not [p for p, q in zip(committed, probe[len(cached):]) if q in ignored], "metrics/plots git ignores"
    assert any(p.startswith("metrics/") for p in committed) and any(p.startswith("plots/") for p in committed)
