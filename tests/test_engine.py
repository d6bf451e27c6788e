"""The shared engine on random tensors: exact resume, early stopping, atomic checkpoints."""
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visionflow.training.engine import BEST, LAST, FitConfig, fit, select_device
from visionflow.tasks.classify import ClassifyTask


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g)
    x[:, 0] += (2 * y[:, None, None] - 1) * 0.5  # learnable: channel 0 is brighter for class 1
    return TensorDataset(x, y)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _loaders(task):
    gen = torch.Generator()
    train = DataLoader(_data(), batch_size=8, shuffle=True, generator=gen, collate_fn=task.collate)
    val = DataLoader(_data(16, seed=1), batch_size=8, collate_fn=task.collate)
    return train, val, gen


def _run(ckpt: Path, epochs=4, stop_after=None, **cfg):
    task = ClassifyTask()
    train, val, gen = _loaders(task)
    model = _model()

    def on_epoch(row):
        if stop_after is not None and row["epoch"] == stop_after:
            raise KeyboardInterrupt  # a crash right after the checkpoint of this epoch
    config = FitConfig(epochs=epochs, lr=0.01, warmup_epochs=1, seed=3, fingerprint="fp", **cfg)
    result = fit(task, model, train, val, config, ckpt, torch.device("cpu"), gen.manual_seed, on_epoch)
    return model, result


def test_resume_is_exact(tmp_path):
    straight, res_a = _run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", stop_after=2)
    resumed, res_b = _run(tmp_path / "b")
    assert res_b.resumed_from == 2
    assert [r["epoch"] for r in res_b.history] == [1, 2, 3, 4]
    for ra, rb in zip(res_a.history, res_b.history):
        assert ra["train_loss"] == rb["train_loss"] and ra["val_loss"] == rb["val_loss"]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_from_other_config_is_not_resumed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, stop_after=1)
    task = ClassifyTask()
    train, val, gen = _loaders(task)
    cfg = FitConfig(epochs=2, lr=0.01, fingerprint="other")
    result = fit(task, _model(), train, val, cfg, tmp_path, torch.device("cpu"), gen.manual_seed)
    assert result.resumed_from == 0 and len(result.history) == 2


def test_early_stopping_and_best_state(tmp_path, caplog):
    # lr=0 -> nothing improves after epoch 1, so patience=2 stops after epoch 3
    task = ClassifyTask()
    train, val, gen = _loaders(task)
    model = _model()
    cfg = FitConfig(epochs=10, lr=1e-12, early_metric="val_loss", early_mode="min", patience=2, min_delta=1e-3)
    with caplog.at_level("INFO", logger="visionflow.training.engine"):
        result = fit(task, model, train, val, cfg, tmp_path, torch.device("cpu"), gen.manual_seed)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1
    # the epoch's own line comes before the decision it led to
    lines = [r.getMessage() for r in caplog.records if r.name == "visionflow.training.engine"]
    assert [m.split()[:2] for m in lines[-2:]] == [["epoch", "3/10"], ["early", "stopping"]], lines
    assert (tmp_path / LAST).exists() and (tmp_path / BEST).exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    # the finished checkpoint loads with weights_only=True (no pickled objects)
    ckpt = torch.load(tmp_path / LAST, weights_only=True)
    assert ckpt["state"]["epoch"] == 3 and ckpt["state"]["stopped"]


def test_training_learns(tmp_path):
    _, result = _run(tmp_path, epochs=6)
    assert result.history[-1]["val_accuracy"] >= 0.75
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")


def test_amp_code_path_runs_on_the_cpu():
    # The CUDA path autocasts (bf16/fp16); the same function under CPU bf16 autocast must
    # produce finite, decreasing losses so the GPU branch is exercised in CI too.
    from visionflow.training.engine import build_scheduler, train_one_epoch

    task = ClassifyTask()
    train, _, gen = _loaders(task)
    gen.manual_seed(0)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = build_scheduler(opt, 3, len(train), 0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [train_one_epoch(task, model, train, opt, sched, scaler, torch.device("cpu"), torch.bfloat16, 5.0, e)["train_loss"]
              for e in range(1, 4)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    # an enabled fp16 scaler's state survives the checkpoint round trip (weights_only)
    s = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    restored = torch.amp.GradScaler("cpu", enabled=True)
    restored.load_state_dict(s.state_dict())
    assert restored.get_scale() == 1024.0


def test_a_pickle_payload_planted_as_checkpoint_is_refused(tmp_path):
    # Checkpoints are loaded with weights_only=True: a crafted last.pt must not run code.
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"fingerprint": "fp", "state": Payload()}, tmp_path / LAST)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        _run(tmp_path, epochs=2)
    assert not (tmp_path / "pwned").exists()


def test_amp_always_trains_in_bf16_on_the_cpu(tmp_path, caplog):
    """train.amp: true is CUDA only; always autocasts to bf16 on the CPU too (oneDNN on AMX or
    AVX512-BF16), or trains in fp32 with a warning on a CPU without bf16 instructions. fit then
    runs the convolutions in bf16 and the model still learns."""
    from visionflow.training.engine import amp_dtype_for, cpu_bf16_supported

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype_for(True, cpu) is None and amp_dtype_for(False, cpu) is None and amp_dtype_for(False, cuda) is None
    expected = torch.bfloat16 if cpu_bf16_supported() else None
    assert amp_dtype_for("always", cpu) == expected
    task = ClassifyTask()
    train, val, gen = _loaders(task)
    model = _model()
    dtypes = []
    model[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype) if m.training else None)
    result = fit(task, model, train, val, FitConfig(epochs=4, lr=0.05, amp="always", seed=0, resume=False),
                 tmp_path, torch.device("cpu"), lambda seed: gen.manual_seed(seed))
    assert dtypes and set(dtypes) == {expected or torch.float32}
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    if expected is None:
        assert "no bf16 instructions" in caplog.text


def _norm_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1, bias=False),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    net[0].bias.requires_grad_(False)  # frozen: in no group
    return net


def test_weight_decay_groups_follow_torchvision_s_reference_split():
    from visionflow.training.engine import param_groups

    net = _norm_net()
    conv, bn, gn, conv2, _, _, ln, fc = net
    trainable = [p for p in net.parameters() if p.requires_grad]
    # nothing set apart: the one group of before, in model.parameters() order
    assert [(g["weight_decay"], g["params"]) for g in param_groups(net, FitConfig(epochs=1, lr=0.1, weight_decay=0.05))] \
        == [(0.05, trainable)]
    same = FitConfig(epochs=1, lr=0.1, weight_decay=0.05, norm_weight_decay=0.05, bias_weight_decay=0.05)
    assert len(param_groups(net, same)) == 1

    def ids(groups):
        return {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}

    norms = {id(p) for m in (bn, gn, ln) for p in m.parameters()}
    got = ids(param_groups(net, FitConfig(epochs=1, lr=0.1, weight_decay=0.05, norm_weight_decay=0.0)))
    assert got == {0.05: {id(conv.weight), id(conv2.weight), id(fc.weight), id(fc.bias)}, 0.0: norms}
    got = ids(param_groups(net, FitConfig(epochs=1, lr=0.1, weight_decay=0.05, norm_weight_decay=0.0,
                                          bias_weight_decay=0.01)))
    assert got == {0.05: {id(conv.weight), id(conv2.weight), id(fc.weight)}, 0.0: norms, 0.01: {id(fc.bias)}}


def test_norm_weight_decay_reaches_the_optimizer_and_changes_only_what_it_names(tmp_path):
    """Trained with a strong decay: the checkpoint's optimizer has the norm layers in a group of
    their own, and the runs differ from the default one; the default equals weight decay given
    explicitly for both (one group, the same steps)."""
    from visionflow.training.engine import LAST

    def run(name, **cfg):
        task = ClassifyTask()
        train, val, gen = _loaders(task)
        net = _norm_net()
        config = FitConfig(epochs=2, lr=0.01, weight_decay=0.5, seed=3, fingerprint="fp", **cfg)
        fit(task, net, train, val, config, tmp_path / name, torch.device("cpu"), gen.manual_seed)
        groups = torch.load(tmp_path / name / LAST, weights_only=True)["optimizer"]["param_groups"]
        return net, sorted((g["weight_decay"], len(g["params"])) for g in groups)

    default, groups = run("default")
    assert groups == [(0.5, 10)]
    explicit, groups = run("explicit", norm_weight_decay=0.5, bias_weight_decay=0.5)
    assert groups == [(0.5, 10)]
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    exempt, groups = run("exempt", norm_weight_decay=0.0)
    assert groups == [(0.0, 6), (0.5, 4)]  # BatchNorm, GroupNorm, LayerNorm: weight and bias each
    assert not torch.equal(exempt[1].weight, default[1].weight)


def test_params_yaml_s_weight_decays_and_ema_reach_the_train_stage(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from project import make_project

    from visionflow.core.config import load_params
    from visionflow.core.paths import Paths
    from visionflow.stages import get_stage
    from visionflow.training.engine import LAST

    over = {"synth": {"n": 24}, "classify": {"train": {
        "model": {"arch": "small_cnn"}, "epochs": 1, "batch_size": 8, "image_size": 32, "num_workers": 0,
        "weight_decay": 0.05, "norm_weight_decay": 0.0, "bias_weight_decay": 0.01, "ema_decay": 0.9}}}
    params = load_params(make_project(tmp_path, over))
    paths = Paths(tmp_path, task="classify")
    for name in ("synth", "ingest", "split", "train-classify"):
        get_stage(name, params).run(params, paths)
    last = torch.load(paths.checkpoint_dir / LAST, weights_only=True)
    assert sorted(g["weight_decay"] for g in last["optimizer"]["param_groups"]) == [0.0, 0.01, 0.05]
    # the weights' average is what the stage saved, not the last weights
    saved = torch.load(paths.model_dir / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in last["ema"].items())
    assert not all(torch.equal(saved[k], v) for k, v in last["model"].items())


def test_the_weights_moving_average_is_an_ema_of_parameters_and_buffers():
    from visionflow.training.engine import WeightEMA

    net = _norm_net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    ema = WeightEMA(net, decay=0.75)
    assert not any(p.requires_grad for p in ema.module.parameters())
    steps = []
    for i in range(3):
        with torch.no_grad():
            for v in net.state_dict().values():
                v.add_(1.0 + i) if v.is_floating_point() else v.add_(5)
        steps.append({k: v.clone() for k, v in net.state_dict().items()})
        ema.update()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():  # 0.75^3 of the start, then each step's weights
            want = 0.75 ** 3 * start[k] + 0.25 * (0.75 ** 2 * steps[0][k] + 0.75 * steps[1][k] + steps[2][k])
            torch.testing.assert_close(v, want, msg=k)
        else:  # BatchNorm's num_batches_tracked: the model's own
            assert torch.equal(v, steps[-1][k]), k
    ema.update(copy_weights=True)  # during warmup: a copy
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in ema.module.state_dict().items())


def test_with_ema_validation_scores_the_average_and_resume_is_exact(tmp_path):
    """ema_decay: validation and the best state are the average's; a run stopped after epoch 2
    resumes to the same average, weights and history as a straight run."""
    from visionflow.training.engine import LAST

    straight, res_a = _run(tmp_path / "a", ema_decay=0.8)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", stop_after=2, ema_decay=0.8)
    resumed, res_b = _run(tmp_path / "b", ema_decay=0.8)
    assert res_b.resumed_from == 2
    assert [r["val_loss"] for r in res_a.history] == [r["val_loss"] for r in res_b.history]
    for k, v in res_a.best_state.items():
        assert torch.equal(v, res_b.best_state[k]), k
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    last = torch.load(tmp_path / "a" / LAST, weights_only=True)
    # the last epoch's average is in the checkpoint; it differs from the last weights
    assert any(not torch.equal(v, straight.state_dict()[k]) for k, v in last["ema"].items())
    assert res_a.best_epoch == 4  # no early-stopping metric: the lowest train loss, the last epoch's
    assert all(torch.equal(res_a.best_state[k], v) for k, v in last["ema"].items())  # the best state is that average
    # and it is what validation scored: the plain run's losses are other numbers
    _, plain = _run(tmp_path / "c")
    assert [r["val_loss"] for r in plain.history] != [r["val_loss"] for r in res_a.history]
    assert [r["train_loss"] for r in plain.history] == [r["train_loss"] for r in res_a.history]
