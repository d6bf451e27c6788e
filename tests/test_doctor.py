"""`visionflow doctor` (the command the FiftyOne connection error points at): one line per check,
exit 1 with what to do when something is wrong, never a traceback. The team servers' checks
(an MLflow server, a Prefect server with a login) are in test_team_mlflow.py and
test_team_prefect_auth.py, beside those servers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from project import free_port, make_project  # noqa: E402

BIN = Path(sys.executable).parent


def doctor(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "visionflow"), "doctor", "--params", str(root / "params.yaml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def _lines(out: str) -> dict[str, str]:
    """{what: 'status detail'} from doctor's output; a check with several lines (DVC: one per
    stale file) has them joined by newlines."""
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        status, _, rest = line.partition(" ")
        what, _, detail = rest.strip().partition(": ")
        if status in ("ok", "info", "problem"):
            found.setdefault(what, []).append(f"{status} {detail}")
    return {what: "\n".join(v) for what, v in found.items()}


def _dvc_repo(root: Path, env: dict[str, str]) -> None:
    quiet = {**env, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=root, env=quiet, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, env=quiet, check=True)


def test_a_healthy_project_has_no_problems(tmp_path):
    """This session's mongod (FIFTYONE_DATABASE_URI, conftest), a sqlite store not made yet, no
    Prefect server of our own, and a DVC repository whose dvc.yaml `visionflow dvc-yaml` wrote."""
    root = tmp_path / "proj"
    make_project(root, name="healthy", tasks=("classify", "detect"))  # one store for both: one line
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    _dvc_repo(root, env)
    subprocess.run([str(BIN / "visionflow"), "dvc-yaml"], cwd=root, env=env, check=True, capture_output=True)
    out = doctor(root, env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = _lines(out.stdout)
    assert lines["install"].startswith("ok python 3."), lines
    assert "torchvision" in lines["install"] and "C++ operators load" in lines["install"]
    assert lines["device"].startswith("info "), lines
    import torch

    from visionflow.training.engine import cpu_bf16_supported

    if not torch.cuda.is_available():  # whether `amp: always` will train in bf16 here
        assert ("`amp: always` trains in bf16" if cpu_bf16_supported() else "`amp: always` trains in fp32") \
            in lines["device"], lines
    assert lines["FiftyOne database"].startswith(f"ok the MongoDB at FIFTYONE_DATABASE_URI ({os.environ['FIFTYONE_DATABASE_URI']}"), lines
    assert lines["MLflow (classify, detect)"] == (f"info sqlite:///{root.resolve() / 'mlflow.db'}: no store yet; the "
                                                  "register stage creates it"), lines
    assert not (root / "mlflow.db").exists()  # doctor writes nothing into the project
    assert lines["Prefect"].startswith("info no PREFECT_API_URL"), lines
    assert lines["DVC"].startswith("ok dvc.yaml"), lines
    assert lines["DVC remote"].startswith("info none (params.yaml remote.url"), lines
    assert lines["shared memory"].startswith("ok /dev/shm has "), lines
    assert "loader workers' batches need about" in lines["shared memory"], lines
    assert out.stdout.rstrip().endswith("no problems found")


def test_every_problem_is_one_line_saying_what_to_do(tmp_path):
    """Nothing answers: FiftyOne's MongoDB, the MLflow server and the Prefect API are closed
    loopback ports, and dvc.yaml is stale. Exit 1, each problem named with what to do."""
    root = tmp_path / "proj"
    closed = [free_port() for _ in range(4)]
    # and a loader whose workers' batches in flight (2 workers x 3 batches of 256 float images at
    # 2048 px: 77 TB) fit no machine's /dev/shm
    make_project(root, {"classify": {"register": {"tracking_uri": f"http://127.0.0.1:{closed[0]}"},
                                     "train": {"num_workers": 2, "batch_size": 256, "image_size": 2048}},
                        "remote": {"url": "s3://team/dvc", "endpoint_url": f"http://127.0.0.1:{closed[3]}"}},
                 name="sick")
    env = {**os.environ, "FIFTYONE_DATABASE_URI": f"mongodb://127.0.0.1:{closed[1]}/?serverSelectionTimeoutMS=300",
           "PREFECT_API_URL": f"http://127.0.0.1:{closed[2]}/api", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-shown", "AWS_DEFAULT_REGION": "us-east-1"}
    _dvc_repo(root, env)
    subprocess.run([str(BIN / "visionflow"), "dvc-yaml"], cwd=root, env=env, check=True, capture_output=True)
    (root / "dvc.yaml").write_text("stages: {}\n")  # hand-made, not what the stage table says
    out = doctor(root, env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    assert "did not answer (attempt" not in out.stderr, out.stderr  # said once, on its check's line
    lines = _lines(out.stdout)
    assert lines["install"].startswith("ok "), lines  # the rest still ran
    fo = lines["FiftyOne database"]
    assert fo.startswith(f"problem the MongoDB at FIFTYONE_DATABASE_URI (mongodb://127.0.0.1:{closed[1]}/"), fo
    assert "did not answer" in fo and "fix or unset FIFTYONE_DATABASE_URI" in fo, fo
    ml = lines["MLflow (classify)"]
    assert ml.startswith(f"problem http://127.0.0.1:{closed[0]}: the server did not answer /health"), ml
    assert "register.tracking_uri" in ml
    pf = lines["Prefect"]
    assert pf.startswith(f"problem PREFECT_API_URL http://127.0.0.1:{closed[2]}/api did not answer /health"), pf
    dvc = lines["DVC"].splitlines()
    assert f"problem {root / 'dvc.yaml'} is out of date with the stage table; run `visionflow dvc-yaml`" in dvc, dvc
    assert all(line.startswith("problem ") and line.endswith("run `visionflow dvc-yaml`") for line in dvc), dvc
    remote = lines["DVC remote"]
    assert remote.startswith(f"problem 'storage' = s3://team/dvc at http://127.0.0.1:{closed[3]}: the store did not "
                             "answer"), remote
    assert "fix remote.endpoint_url" in remote and "s3cr3t-never-shown" not in out.stdout + out.stderr
    shm = lines["shared memory"]
    assert shm.startswith("problem classify: the loader workers' batches in flight need about "), shm
    assert "of shared memory, but /dev/shm has " in shm and "--shm-size=" in shm and "num_workers" in shm, shm
    assert out.stdout.rstrip().endswith(f"{5 + len(dvc)} problem(s)"), out.stdout


def test_without_a_params_file_the_machine_is_still_checked(tmp_path):
    out = subprocess.run([str(BIN / "visionflow"), "doctor"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = _lines(out.stdout)
    assert lines["project"] == "info no params.yaml: the project's checks are skipped (--params)", lines
    assert lines["FiftyOne database"].startswith("ok "), lines


@pytest.fixture
def no_aws_credentials(tmp_path, monkeypatch):
    """botocore finds no credentials of this machine's: none in the environment, no profile, no
    files under ~/.aws, no instance-metadata lookup off the machine."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_an_s3_remote_without_credentials_says_which_to_set(no_aws_credentials):
    """botocore's own credential search (environment, AWS_PROFILE, the files under ~/.aws) finds
    nothing: the line names the variables to set (the team test has a bucket that answers)."""
    from visionflow.doctor import _s3_bucket_problem

    why = _s3_bucket_problem("team", f"http://127.0.0.1:{free_port()}")
    assert why is not None and why.startswith("no S3 credentials in this environment: set AWS_ACCESS_KEY_ID and "
                                              "AWS_SECRET_ACCESS_KEY"), why


def test_credentials_in_config_local_count_as_dvc_takes_them(tmp_path, no_aws_credentials):
    """`dvc remote modify --local storage access_key_id ...` puts the keys in .dvc/config.local
    (not committed): the remote's settings merge them over .dvc/config, and the bucket check uses
    them (so it gets as far as the endpoint, here a closed port, instead of asking for keys)."""
    from visionflow.doctor import _s3_bucket_problem
    from visionflow.integrations.dvc import default_remote

    root = tmp_path / "proj"
    root.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    port = free_port()
    for args in (["init", "-q"], ["remote", "add", "-d", "storage", "s3://team/dvc"],
                 ["remote", "modify", "storage", "endpointurl", f"http://127.0.0.1:{port}"],
                 ["remote", "modify", "--local", "storage", "access_key_id", "local-key"],
                 ["remote", "modify", "--local", "storage", "secret_access_key", "local-secret"]):
        subprocess.run([*dvc, *args], cwd=root, env=env, check=True, capture_output=True)
    assert "local-secret" not in (root / ".dvc" / "config").read_text()
    name, remote = default_remote(root / ".dvc")
    assert name == "storage" and remote == {"url": "s3://team/dvc", "endpointurl": f"http://127.0.0.1:{port}",
                                            "access_key_id": "local-key", "secret_access_key": "local-secret"}
    why = _s3_bucket_problem("team", remote["endpointurl"], remote)
    assert why is not None and why.startswith("the store did not answer"), why
    assert "local-secret" not in why


def test_a_remotes_credentialpath_is_read_as_dvc_reads_it(tmp_path, no_aws_credentials):
    """`dvc remote modify --local storage credentialpath FILE`: the check takes the keys from that
    file (so it reaches the endpoint, a closed port here), and leaves this process's environment
    as it was."""
    from visionflow.doctor import _s3_bucket_problem

    creds = tmp_path / "team-credentials"
    creds.write_text("[default]\naws_access_key_id = file-key\naws_secret_access_key = file-secret\n")
    why = _s3_bucket_problem("team", f"http://127.0.0.1:{free_port()}", {"credentialpath": str(creds)})
    assert why is not None and why.startswith("the store did not answer"), why
    assert os.environ["AWS_SHARED_CREDENTIALS_FILE"] == str(tmp_path / "none")


@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn"])
def test_the_shared_memory_estimate_counts_mask_r_cnn_s_mask_per_object(tmp_path, arch, monkeypatch):
    """Mask R-CNN's targets carry a uint8 (S, S) mask per object through shared memory too:
    counted at the manifest's mean objects an image (here 10), before ingest said not to be
    counted; a box-only detector's targets add nothing. (/dev/shm taken as 8 GiB free.)"""
    from visionflow.core.config import load_params
    from visionflow.core.paths import Paths
    from visionflow.doctor import _shared_memory
    from visionflow.manifest import Instance, Sample, write_manifest
    from visionflow.training import batch_slots

    monkeypatch.setattr(batch_slots, "shm_space", lambda: (8 << 30, 8 << 30))
    root = tmp_path / "proj"
    # 2 workers x 3 batches in flight x 8 float32 images of 512 px, on the CPU
    make_project(root, {"detect": {"train": {"model": {"arch": arch}, "num_workers": 2, "batch_size": 8,
                                             "image_size": 512, "device": "cpu"}}}, tasks=("detect",))
    params, paths = load_params(root / "params.yaml"), Paths(root)
    images = 2 * 3 * 8 * 3 * 512 ** 2 * 4
    masks = 2 * 3 * 8 * 10 * 512 ** 2 if arch == "maskrcnn" else 0

    (line,) = list(_shared_memory(params, paths))
    assert line[:2] == ("ok", "shared memory"), line
    assert f"need about {images / 2 ** 20:,.0f} MiB at most (detect)" in line[2], line
    assert ("instance masks are not counted until the ingest stage has written manifest.jsonl" in line[2]) == bool(masks)

    paths.manifest.parent.mkdir(parents=True)
    box = Instance(bbox=[0, 0, 4, 4], category_id=0)
    write_manifest(paths.manifest, [Sample(id=f"s{i}", root=".", path=f"{i}.jpg", width=64, height=64, sha256="0" * 64,
                                           instances=[box] * n) for i, n in enumerate((5, 15, 10))])
    (line,) = list(_shared_memory(params, paths))
    assert f"need about {(images + masks) / 2 ** 20:,.0f} MiB at most (detect)" in line[2], line
    assert "not counted" not in line[2], line
