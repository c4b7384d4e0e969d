"""``pyro-slots train --tf32 on|off``: TensorFloat-32 on a GPU, set for the training and
restored after it (the settings exist, and are checked here, without a GPU)."""

import importlib
import types

import pytest
import torch

import pyro_slots.cli as cli
from pyro_slots.cli.config import TrainConfig

# The module (pyro_slots.cli.train is the function the package exports).
train_module = importlib.import_module("pyro_slots.cli.train")


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("tf32, during", [(True, (True, True)), (False, (False, False))])
def test_train_sets_tf32_for_the_run_and_restores_it(tmp_path, monkeypatch, tf32, during):
    seen = []

    def fake_train_in(run, *args):
        seen.append(_flags())
        return run

    monkeypatch.setattr(train_module, "_train_in", fake_train_in)
    before = _flags()
    train_module.train(TrainConfig(out=str(tmp_path / "run")), tf32=tf32, progress=False)
    assert seen == [during]
    assert _flags() == before
    # None keeps torch's settings as they are.
    train_module.train(TrainConfig(out=str(tmp_path / "run2")), progress=False)
    assert seen[-1] == before


@pytest.mark.parametrize("flag, expected", [(["--tf32", "on"], True), (["--tf32", "off"], False),
                                            ([], None)])  # fmt: skip
def test_cli_flag_reaches_train(tmp_path, monkeypatch, flag, expected):
    calls = []

    def fake_train(config=None, **options):
        calls.append(options["tf32"])
        return types.SimpleNamespace(step=0, config=types.SimpleNamespace(out=str(tmp_path)))

    monkeypatch.setattr(cli, "train", fake_train)
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--no-pictures", *flag]) == 0
    assert calls == [expected]


def test_cli_rejects_another_value(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--tf32", "maybe"])
    assert "--tf32" in capsys.readouterr().err
