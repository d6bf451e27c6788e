"""A team's DVC remote for real: an S3 remote on moto's S3-compatible server (loopback).

In a temporary git repository the remote is configured from params.yaml (`remote:`, written
into .dvc/config by `visionflow dvc-yaml`); the classify and detect branches run under `dvc
repro`; `dvc push` sends the cache (data, manifest, models) to the bucket. A fresh `git clone`
then `dvc pull`s and finds every output byte-equal, `dvc status` clean and `dvc repro` with
nothing to run. The remote's endpoint is committed in .dvc/config; its credentials come from the
environment only, and a clone without them is refused by the store. An experiment
(`dvc exp run -S detect.train.epochs=3`) re-runs the detect branch only, is pushed with `dvc exp
push`, and a teammate's clone pulls it and sees it in `dvc exp show`."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import REPO, make_project  # noqa: E402
from team_services import S3_ENV, s3_keys, s3_server  # noqa: E402

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
BASE_ENV = {k: v for k, v in os.environ.items() if k not in S3_ENV}
BASE_ENV.update({"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_WAIT_POLICY": "PASSIVE",
                 "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@t"})
ENV = {**BASE_ENV, **S3_ENV}  # a team member with the store's credentials in their environment
DVC = [sys.executable, "-m", "dvc"]
BUCKET = "dvc-store"


def _run(cmd, cwd, env=ENV, ok=True) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if ok:
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    else:
        assert out.returncode != 0, f"{cmd} should have failed:\n{out.stdout[-3000:]}"
    return out.stdout + out.stderr


def _uncached(root: Path, stage: str, path: str) -> bool:
    """dvc.yaml declares `path` of `stage` with `cache: false` (metrics, small reports)."""
    entry = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    return any(isinstance(o, dict) and path in o and o[path].get("cache") is False
               for o in entry.get("outs", []) + entry.get("metrics", []) + entry.get("plots", []))


def _outputs(root: Path, lock: dict) -> dict[str, bytes]:
    """Every file of every output dvc.lock records (data, manifest, split, model, reports), by
    relative path."""
    found = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = root / out["path"]
            for f in [path] if path.is_file() else sorted(path.rglob("*")):
                if f.is_file():
                    found[str(f.relative_to(root))] = f.read_bytes()
    return found


def test_push_to_s3_then_a_fresh_clone_pulls_and_reproduces_nothing(tmp_path):
    root = tmp_path / "proj"
    make_project(root, name="teamdvc", tasks=("classify", "detect"),
                 overrides={"remote": {"url": f"s3://{BUCKET}/cache", "endpoint_url": "ENDPOINT"}})
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")

    with s3_server(tmp_path, buckets=(BUCKET,)) as endpoint:
        _run(["git", "init", "-q"], root)
        _run([*DVC, "init", "-q"], root)
        _run([*DVC, "config", "core.analytics", "false"], root)
        params = root / "params.yaml"
        params.write_text(params.read_text().replace("ENDPOINT", endpoint))
        _run([str(BIN / "visionflow"), "dvc-yaml"], root)  # writes the remote into .dvc/config
        _run([str(BIN / "visionflow"), "dvc-yaml", "--check"], root)
        remotes = _run([*DVC, "remote", "list"], root)
        assert f"s3://{BUCKET}/cache" in remotes and "storage" in remotes, remotes
        # `visionflow doctor` reaches the bucket with this environment's credentials, never shows them
        doctor = _run([str(BIN / "visionflow"), "doctor"], root)
        assert (f"ok       DVC remote: 'storage' = s3://{BUCKET}/cache at {endpoint}: the bucket answers with this "
                "environment's credentials") in doctor.splitlines(), doctor
        assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in doctor
        _run(["git", "add", "-A"], root)
        _run(["git", "commit", "-qm", "project"], root)

        _run([*DVC, "repro"], root)
        _run(["git", "add", "-A"], root)
        _run(["git", "commit", "-qm", "pipeline ran"], root)
        config = (root / ".dvc" / "config").read_text()
        assert endpoint in config and S3_ENV["AWS_SECRET_ACCESS_KEY"] not in config
        assert S3_ENV["AWS_ACCESS_KEY_ID"] not in config and not (root / ".dvc" / "config.local").exists()

        pushed = _run([*DVC, "push"], root)
        # every file in the local cache's object store (not its run cache, which `push` leaves out)
        files = root / ".dvc" / "cache" / "files"
        cache = sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.is_file())
        keys = sorted(k.removeprefix("cache/files/") for k in s3_keys(endpoint, BUCKET, "cache/"))
        # ... except the run cache's copies of `cache: false` outputs (DVC commits those of a
        # stage whose deps are all hashable so it can restore them; `push` leaves them out, as
        # git carries them): each must be such an output, by its md5 in dvc.lock
        uncached = {out["md5"] for name, stage in yaml.safe_load((root / "dvc.lock").read_text())["stages"].items()
                    for out in stage.get("outs", []) if _uncached(root, name, out["path"])}
        run_cache_copies = [c for c in cache if c not in keys]
        assert all(c.replace("md5/", "").replace("/", "") in uncached for c in run_cache_copies), run_cache_copies
        assert sorted(set(cache) - set(run_cache_copies)) == keys and len(keys) > 10, (pushed, keys[:5], cache[:5])
        assert f"{len(keys)} files pushed" in pushed
        assert json.loads(_run([*DVC, "status", "--cloud", "--json"], root)) == {}

        clone = tmp_path / "clone"
        _run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
        # no credentials: the store refuses, nothing is pulled
        _run([*DVC, "pull"], clone, env=BASE_ENV, ok=False)
        assert not (clone / "models").exists()

        pulled = _run([*DVC, "pull"], clone)
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        expected = _outputs(root, lock)
        assert _outputs(clone, lock) == expected and len(expected) > 10, pulled
        assert (clone / "data").is_dir() and (clone / "models" / "classify" / "model.pt").is_file()

        status = _run([*DVC, "status"], clone)
        assert "up to date" in status and "changed" not in status, status
        again = _run([*DVC, "repro"], clone)
        assert "Running stage" not in again, again

        # an experiment on the detect branch: only that branch re-runs; a teammate sees it
        ran = _run([*DVC, "exp", "run", "-n", "detect-3ep", "-S", "detect.train.epochs=3"], root)
        stages = set(re.findall(r"Running stage '([^']+)'", ran))
        assert stages and all(s.endswith("-detect") for s in stages) and "train-detect" in stages, ran
        team = tmp_path / "team.git"  # the team's git server: code and experiment refs
        _run(["git", "init", "-q", "--bare", str(team)], tmp_path)
        _run(["git", "remote", "add", "team", str(team)], root)
        _run(["git", "push", "-q", "team", "HEAD"], root)
        _run([*DVC, "exp", "push", "team", "detect-3ep"], root)  # refs to git, its cache to the S3 remote
        _run(["git", "remote", "add", "team", str(team)], clone)
        _run([*DVC, "exp", "pull", "team", "detect-3ep"], clone)
        rows = {}
        for commit in json.loads(_run([*DVC, "exp", "show", "--json"], clone)):
            for exp in commit.get("experiments") or []:
                for rev in exp.get("revs", []):
                    rows[exp.get("name") or rev["rev"]] = rev["data"]
        assert "detect-3ep" in rows, list(rows)
        data = rows["detect-3ep"]
        assert data["params"]["params.yaml"]["data"]["detect"]["train"]["epochs"] == 3
        assert 1 <= data["metrics"]["metrics/detect/train.json"]["data"]["epochs_run"] <= 3
        assert data["metrics"]["metrics/detect/evaluate.json"]["data"]["primary_metric"] == "AP50"
        _run([*DVC, "exp", "apply", "detect-3ep"], clone)  # its model comes from the S3 remote
        _run([*DVC, "checkout"], clone)
        assert json.loads(_run([*DVC, "status", "--json"], clone)) == {}


def test_remote_from_params_or_env_is_written_and_checked(tmp_path):
    """`remote:` in params.yaml (or $VISIONFLOW_DVC_REMOTE_URL) becomes .dvc/config's default
    remote; `visionflow dvc-yaml --check` names a remote that no longer matches."""
    root = tmp_path / "proj"
    make_project(root, name="remote")
    env = {**BASE_ENV, "VISIONFLOW_DVC_REMOTE_URL": "s3://from-env/dvc"}
    _run(["git", "init", "-q"], root, env=env)
    _run([*DVC, "init", "-q"], root, env=env)
    _run([str(BIN / "visionflow"), "dvc-yaml"], root, env=env)
    config = (root / ".dvc" / "config").read_text()
    assert "s3://from-env/dvc" in config and "remote = storage" in config, config
    _run([str(BIN / "visionflow"), "dvc-yaml", "--check"], root, env=env)  # the env's remote is in place
    params = root / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("remote:\n  name: storage\n  url: null",
                                   "remote:\n  name: storage\n  url: s3://team-bucket/dvc"))
    assert params.read_text() != text
    stale = _run([str(BIN / "visionflow"), "dvc-yaml", "--check"], root, env=env, ok=False)
    assert "s3://team-bucket/dvc" in stale and "visionflow dvc-yaml" in stale, stale
    _run([str(BIN / "visionflow"), "dvc-yaml"], root, env=env)  # params.yaml wins over the environment
    _run([str(BIN / "visionflow"), "dvc-yaml", "--check"], root, env=env)
    config = (root / ".dvc" / "config").read_text()
    assert "s3://team-bucket/dvc" in config and "from-env" not in config, config
