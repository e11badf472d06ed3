"""The self-launch under horovodrun (dalle.distributed.launch): command line, guards, one-line
errors for bad topology params; and no horovod import on a single process."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from dalle.distributed import launch
from dalle.errors import ConfigError
from dalle.runner import run_guarded
from tests.helpers import section


def test_command_line_and_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOROVOD_GLOO_IFACE", "eth1")
    cmd = launch.horovodrun_command(section("distributed", num_proc=4, shard_group_size=2, hosts="a:2,b:2"),
                                    ["python", "-m", "stages.train_prior"])
    assert cmd[0].endswith("horovodrun")
    assert cmd[1:] == ["-np", "4", "-H", "a:2,b:2", "--gloo", "--network-interface", "eth1",
                       "python", "-m", "stages.train_prior"]


def test_no_relaunch_for_one_process_or_under_horovod(monkeypatch: pytest.MonkeyPatch) -> None:
    assert launch.relaunch_if_needed(section("distributed"), "x") is None
    monkeypatch.setenv("HOROVOD_RANK", "0")
    assert launch.relaunch_if_needed(section("distributed", num_proc=2), "x") is None


def test_too_few_host_slots_is_one_line_and_exit_1(capsys: pytest.CaptureFixture) -> None:
    cfg = section("distributed", num_proc=4, hosts="a:1,b:2")
    with pytest.raises(SystemExit) as exc:
        run_guarded(lambda: launch.horovodrun_command(cfg, ["python"]))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: distributed.hosts 'a:1,b:2' offers 3 slots, fewer than "
                   "distributed.num_proc 4"]


def test_groups_must_divide() -> None:
    with pytest.raises(ValidationError, match="not a multiple of shard_group_size 2"):
        section("distributed", num_proc=3, shard_group_size=2)


def test_single_process_training_never_imports_horovod() -> None:
    code = ("import sys; from dalle.config import REPO_ROOT, load_params; "
            "from dalle.distributed.strategy import ShardedStrategy; "
            "from dalle.distributed.toy import ToyConfig, train_toy; "
            "cfg = load_params(REPO_ROOT / 'params.yaml').distributed; "
            "train_toy(ToyConfig(d_model=16, n_layers=1), ShardedStrategy.from_config(cfg), 1); "
            "assert not any(m.startswith('horovod') for m in sys.modules), 'horovod imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _rank_device(monkeypatch: pytest.MonkeyPatch, name: str, nccl: bool, local: int,
                 gpus: int) -> object:
    """ShardedStrategy.device on a simulated Horovod rank of a host with `gpus` GPUs."""
    import types

    import torch

    from dalle.distributed import strategy

    fake = types.SimpleNamespace(local_rank=lambda: local, nccl_built=lambda: nccl)
    monkeypatch.setitem(sys.modules, "dalle.distributed.horovod", fake)
    monkeypatch.setattr("dalle.distributed.horovod", fake, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    strat = strategy.ShardedStrategy(section("distributed"))
    strat.world = types.SimpleNamespace(rank=local, size=2)  # as if under horovodrun
    try:
        return strat.device(name), chosen
    except ConfigError as exc:
        return exc, chosen


def test_sharded_rank_takes_its_own_gpu_only_with_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:<local rank> per rank when Horovod has NCCL; a Gloo-only build keeps `auto`
    ranks on CPU and refuses an explicit `cuda` in one line; more ranks than GPUs is an error."""
    dev, chosen = _rank_device(monkeypatch, "auto", nccl=True, local=1, gpus=2)
    assert str(dev) == "cuda:1" and chosen == [1]
    dev, chosen = _rank_device(monkeypatch, "auto", nccl=False, local=1, gpus=2)
    assert str(dev) == "cpu" and chosen == []
    err, _ = _rank_device(monkeypatch, "cuda", nccl=False, local=0, gpus=2)
    assert isinstance(err, ConfigError) and "HOROVOD_GPU_OPERATIONS=NCCL" in str(err)
    err, _ = _rank_device(monkeypatch, "cuda", nccl=True, local=2, gpus=2)
    assert isinstance(err, ConfigError) and "at most one rank per GPU" in str(err)
    dev, _ = _rank_device(monkeypatch, "cpu", nccl=True, local=0, gpus=2)
    assert str(dev) == "cpu"
