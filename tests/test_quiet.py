"""Quiet by default: the real commands print visionflow's lines, not other libraries' INFO
chatter (torch.onnx's onnx_ir/onnxscript, MLflow) unless -v asks for it."""
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402


def _cli(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return (out.stdout + out.stderr).splitlines()


def test_onnx_export_prints_its_own_lines_only_unless_verbose(tmp_path):
    from test_export import make_model_dir

    model = make_model_dir(tmp_path / "model", "classify")
    args = ("export-model", "--model", str(model), "--format", "onnx", "--samples", "0")
    quiet = _cli(*args, "--out", str(tmp_path / "a.onnx"), cwd=tmp_path)
    assert not [line for line in quiet if "onnx_ir" in line or "onnxscript" in line], quiet
    assert len(quiet) <= 6 and any(line.startswith("wrote ") for line in quiet), quiet
    verbose = _cli("-v", *args, "--out", str(tmp_path / "b.onnx"), cwd=tmp_path)
    assert any("onnx_ir" in line or "onnxscript" in line for line in verbose), verbose  # -v shows them


def test_register_prints_no_mlflow_chatter(tmp_path):
    import test_register

    make_project(tmp_path)  # params.yaml: a classify branch on a sqlite store in tmp_path
    test_register.make_project(tmp_path)  # what train and evaluate hand to register
    lines = _cli("stage", "register-classify", cwd=tmp_path)
    text = "\n".join(lines)
    assert "CloudPickle" not in text and " INFO mlflow" not in text, text
    assert any(line.startswith("[register-classify] ") for line in lines), text
    assert len(lines) <= 6, text
