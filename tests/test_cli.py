"""The command line as a user meets it: fast help, clear errors with exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import REPO, make_project  # noqa: E402


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_does_not_import_heavy_libraries():
    code = ("import sys, visionflow.cli as c; c.build_parser().format_help(); "
            "print(sorted(m for m in ('torch','pydantic','mlflow','fiftyone','prefect','albumentations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    help_text = _cli("--help").stdout
    for command in ("data", "stage", "run", "schedule", "ui", "weights", "dvc-yaml"):
        assert command in help_text


def test_stage_with_missing_input_names_the_file_and_the_stage(tmp_path):
    make_project(tmp_path)
    out = _cli("stage", "train-classify", "--params", str(tmp_path / "params.yaml"))
    assert out.returncode == 2
    assert "manifest.jsonl" in out.stderr and "ingest" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_params_key_is_reported(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["split"]["sed"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _cli("stage", "split", "--params", str(tmp_path / "params.yaml"))
    assert out.returncode == 2
    assert "split.sed: unknown key" in out.stderr


def test_unknown_stage_is_rejected(tmp_path):
    make_project(tmp_path)  # classify branch only
    for name in ("deploy", "train", "train-detect"):
        out = _cli("stage", name, "--params", str(tmp_path / "params.yaml"))
        assert out.returncode == 2 and f"unknown stage '{name}'" in out.stderr, out.stderr
        assert "train-classify" in out.stderr and "Traceback" not in out.stderr


def test_data_synth_writes_a_coco_dataset(tmp_path):
    out = _cli("data", "synth", "--out", str(tmp_path / "shapes"), "--n", "6", "--size", "48", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "wrote 6 images" in out.stdout
    coco = yaml.safe_load((tmp_path / "shapes" / "annotations.json").read_text())  # JSON is YAML
    assert len(coco["images"]) == 6 and len(coco["categories"]) == 5


def test_stage_help_names_every_stage_of_the_table():
    from visionflow.stages import STAGES

    out = subprocess.run([sys.executable, "-m", "visionflow.cli", "stage", "--help"], capture_output=True, text=True)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and all(s.name in text for s in STAGES) and "promote" in text


@pytest.mark.parametrize("args, message", [
    (["data", "synth", "--out", "x", "--n", "-5"], "argument --n: -5 is not a number at least 1"),
    (["data", "synth", "--out", "x", "--size", "4096"], "argument --size: 4096 is not a number from 32 to 2048"),
    (["predict", "--model", "m", "--images", "i", "--batch-size", "0"], "argument --batch-size: 0 is not a number"),
    (["serve", "--model", "m", "--port", "70000"], "argument --port: 70000 is not a TCP port from 1 to 65535"),
    (["data", "synth", "--out", "x", "--n", "ten"], "argument --n: 'ten' is not a whole number"),
])
def test_absurd_numbers_are_refused_before_anything_runs(tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command", [["predict", "--images", "."], ["serve"], ["export-model", "--out", "m.onnx"]])
def test_a_registered_name_without_alias_or_version_says_to_add_one(tmp_path, command):
    """MLflow reads models:/NAME as a logged model id ("Logged model with ID ... not found");
    every command that takes --model says what is missing before it opens a store."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    out = _cli(*command, "--model", "models:/shapes-classifier", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert ("models:/shapes-classifier: which version? Add an alias or a version number: "
            "models:/shapes-classifier@champion (or @candidate) or models:/shapes-classifier/1") in out.stderr


def test_every_stage_a_message_names_exists():
    """Hints name runnable stages: `visionflow stage train` does not exist (train-classify does)."""
    import re

    from visionflow.stages import STAGES

    shared = {s.name for s in STAGES if not s.branch}
    branch = {s.name for s in STAGES if s.branch}
    named = {(path.name, m) for path in (REPO / "src").rglob("*.py")
             for m in re.findall(r"visionflow stage ([a-z<][\w<>{}.-]*)", path.read_text())}
    wrong = sorted((f, m) for f, m in named
                   if m not in shared and not ("-" in m and m.split("-")[0] in branch) and not m.startswith("{"))
    assert not wrong, wrong
    assert named  # the pattern matches what the messages look like


def _cli_mentions() -> list[tuple[str, str]]:
    """(file, command line) for every visionflow command the docs and the code's messages show:
    in backticks (README, docs, examples, src, flows) and on the lines of fenced code blocks."""
    import re

    quoted = re.compile(r"`((?:[\w./]*/)?visionflow(?: [^`\n]*)?)`")
    fenced = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "examples").glob("*/README.md"),
             *(REPO / "src").rglob("*.py"), *(REPO / "flows").glob("*.py")]
    found = []
    for path in files:
        text = path.read_text()
        found += [(path.name, m) for m in quoted.findall(text)]
        if path.suffix == ".md":
            found += [(path.name, line.strip()) for block in fenced.findall(text) for line in block.splitlines()
                      if re.match(r"\s*(?:[\w./]*/)?visionflow ", line)]
    return found


def _cli_problem(parser, line: str):
    """Why `line` would not parse (a command, subcommand, app or option that does not exist), or
    None. Placeholders (<task>, NAME, ...) and what follows them are not checked."""
    import argparse
    import shlex

    try:
        words = shlex.split(line.split("#")[0])
    except ValueError:
        words = line.split()
    words = words[1:]  # after (.venv/bin/)visionflow
    p, where, i = parser, "visionflow", 0
    while i < len(words):
        w = words[i]
        i += 1
        if any(c in w for c in "<>|[]{}$") or w.isupper() or w in ("...", "&&", ";"):
            return None
        if w.startswith("-"):
            opt = w.split("=")[0]
            if opt.startswith("-v") and set(opt[1:]) == {"v"}:
                opt = "-v"  # a count: -vv
            action = p._option_string_actions.get(opt)
            if action is None:
                return f"`{where}` has no option {opt}"
            if action.nargs != 0 and "=" not in w:
                i += 1  # its value
            continue
        sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is not None and w not in sub.choices:
            return f"`{where}` has no command {w!r}"
        if sub is not None:
            p, where = sub.choices[w], f"{where} {w}"
            continue
        fixed = [a for a in p._actions if not a.option_strings and a.choices]
        if fixed and w not in fixed[0].choices:
            return f"`{where}` has no {fixed[0].dest} {w!r}"
    return None


def test_every_command_the_docs_and_messages_show_exists():
    """A message or a doc that tells the user to run a command names one the CLI has, with
    options it takes (an error once pointed at `visionflow doctor` before it existed)."""
    from visionflow.cli import build_parser

    parser, mentions = build_parser(), _cli_mentions()
    wrong = sorted({(f, line, why) for f, line in mentions if (why := _cli_problem(parser, line))})
    assert not wrong, wrong
    assert len(mentions) > 150  # the patterns find what the docs look like
    assert _cli_problem(parser, "visionflow doktor") == "`visionflow` has no command 'doktor'"
    assert _cli_problem(parser, "visionflow ui fiftyone --tsk detect") == "`visionflow ui` has no option --tsk"
    assert _cli_problem(parser, "visionflow ui tensorboard") == "`visionflow ui` has no app 'tensorboard'"


def test_ctrl_c_stops_the_mlflow_ui_quietly(tmp_path):
    """Ctrl-C (SIGINT to the command) stops `ui mlflow` and its server without a traceback
    (uvicorn answered the SIGINT it was sent with a KeyboardInterrupt / CancelledError one)."""
    import signal
    import socket

    from visionflow.core.service import wait_for_http

    make_project(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A terminal's Ctrl-C reaches a command whose SIGINT is at its default; a test run started in
    # the background by a non-interactive shell (`make test &`) inherits SIGINT ignored, which
    # the command would inherit too, and then sit through the Ctrl-C this test sends.
    ui = subprocess.Popen([sys.executable, "-m", "visionflow.cli", "ui", "mlflow", "--port", str(port)],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=ui), "MLflow UI did not start"
        ui.send_signal(signal.SIGINT)
        out, _ = ui.communicate(timeout=60)
    finally:
        if ui.poll() is None:
            ui.kill()
    assert ui.returncode in (0, 130) and "Traceback" not in out and "CancelledError" not in out, out
    with socket.socket() as s:  # the server and its workers are gone
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_the_end_of_run_summary_names_a_command_that_runs_from_where_the_user_is(tmp_path, monkeypatch):
    """`visionflow run` ends with the commands that open the UIs: `.venv/bin/visionflow` only
    where that path exists (the checkout's root), else the script's own path, or plain
    `visionflow` when PATH finds this one."""
    from visionflow.integrations.prefect import cli_command

    exe = Path(sys.executable).parent / "visionflow"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(REPO)
    assert cli_command() == str(exe.relative_to(REPO))
    monkeypatch.chdir(tmp_path)  # a project elsewhere (seen: /tmp/project printed .venv/bin/visionflow)
    assert cli_command() == str(exe) and exe.is_file()
    monkeypatch.setenv("PATH", f"{exe.parent}:/usr/bin:/bin")
    assert cli_command() == "visionflow"
