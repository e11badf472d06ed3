"""The self-launch under horovodrun (dalle.distributed.launch): command line, guards, one-line
errors for bad topology params; and no horovod import on a single process."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from dalle.config_sections import Distributed
from dalle.distributed import launch
from dalle.errors import ConfigError
from dalle.runner import run_guarded


def test_command_line_and_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOROVOD_GLOO_IFACE", "eth1")
    cmd = launch.horovodrun_command(Distributed(num_proc=4, shard_group_size=2, hosts="a:2,b:2"),
                                    ["python", "-m", "stages.train_prior"])
    assert cmd[0].endswith("horovodrun")
    assert cmd[1:] == ["-np", "4", "-H", "a:2,b:2", "--gloo", "--network-interface", "eth1",
                       "python", "-m", "stages.train_prior"]


def test_no_relaunch_for_one_process_or_under_horovod(monkeypatch: pytest.MonkeyPatch) -> None:
    assert launch.relaunch_if_needed(Distributed(), "x") is None
    monkeypatch.setenv("HOROVOD_RANK", "0")
    assert launch.relaunch_if_needed(Distributed(num_proc=2), "x") is None


def test_too_few_host_slots_is_one_line_and_exit_1(capsys: pytest.CaptureFixture) -> None:
    cfg = Distributed(num_proc=4, hosts="a:1,b:2")
    with pytest.raises(SystemExit) as exc:
        run_guarded(lambda: launch.horovodrun_command(cfg, ["python"]))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: distributed.hosts 'a:1,b:2' offers 3 slots, fewer than "
                   "distributed.num_proc 4"]


def test_groups_must_divide() -> None:
    with pytest.raises(ValidationError, match="not a multiple of shard_group_size 2"):
        Distributed(num_proc=3, shard_group_size=2)


def test_single_process_training_never_imports_horovod() -> None:
    code = ("import sys; from dalle.config_sections import Distributed; "
            "from dalle.distributed.strategy import ShardedStrategy; "
            "from dalle.distributed.toy import ToyConfig, train_toy; "
            "train_toy(ToyConfig(d_model=16, n_layers=1), ShardedStrategy.from_config(Distributed()), 1); "
            "assert not any(m.startswith('horovod') for m in sys.modules), 'horovod imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
