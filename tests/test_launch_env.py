"""Launcher environment parsing: torchrun, Slurm, a lone process, and the bad cases."""

from __future__ import annotations

import pytest

from megalith.errors import ConfigError
from megalith.parallel.launch_env import LaunchEnv, default_slurm_port, first_slurm_host, read_launch_env

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[017-020]",
    "SLURM_JOB_ID": "123456",
}


def assert_one_line_error(call, *mentions):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message
    for m in mentions:
        assert m in message, (message, m)


def test_single_process():
    assert read_launch_env({}) == LaunchEnv(0, 1, 0, "127.0.0.1", 29500, "single")
    assert read_launch_env({"PATH": "/bin", "MASTER_ADDR": "x"}).launcher == "single"


def test_torchrun():
    assert read_launch_env(TORCHRUN) == LaunchEnv(3, 8, 1, "10.0.0.5", 29400, "torchrun")


def test_torchrun_wins_over_slurm():
    env = {**SLURM, **TORCHRUN}
    assert read_launch_env(env).launcher == "torchrun"
    assert read_launch_env(env).rank == 3


@pytest.mark.parametrize("missing", ["WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_torchrun_missing_companion(missing):
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    assert_one_line_error(lambda: read_launch_env(env), missing, "RANK")


@pytest.mark.parametrize(
    "name, value",
    [("RANK", "three"), ("WORLD_SIZE", "8.0"), ("LOCAL_RANK", "x"), ("MASTER_PORT", "http")],
)
def test_torchrun_non_integer(name, value):
    assert_one_line_error(lambda: read_launch_env({**TORCHRUN, name: value}), name, value)


@pytest.mark.parametrize(
    "name, value",
    [("RANK", "-1"), ("WORLD_SIZE", "0"), ("MASTER_PORT", "70000"), ("MASTER_PORT", "0")],
)
def test_torchrun_out_of_range(name, value):
    assert_one_line_error(lambda: read_launch_env({**TORCHRUN, name: value}), name, value)


def test_rank_not_below_world():
    assert_one_line_error(lambda: read_launch_env({**TORCHRUN, "RANK": "8"}), "8")
    assert_one_line_error(lambda: read_launch_env({**SLURM, "SLURM_PROCID": "16"}), "16")


def test_slurm_defaults_from_nodelist_and_job_id():
    assert read_launch_env(SLURM) == LaunchEnv(5, 16, 1, "gpu017", 10000 + 123456 % 50000, "slurm")


def test_slurm_master_overrides():
    env = {**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "12345"}
    got = read_launch_env(env)
    assert (got.master_addr, got.master_port) == ("head", 12345)


def test_slurm_falls_back_to_old_nodelist_and_default_port():
    env = {k: v for k, v in SLURM.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_JOB_ID")}
    env["SLURM_NODELIST"] = "n7,n8"
    got = read_launch_env(env)
    assert (got.master_addr, got.master_port, got.launcher) == ("n7", 29500, "slurm")


@pytest.mark.parametrize("missing", ["SLURM_NTASKS", "SLURM_LOCALID"])
def test_slurm_missing_companion(missing):
    env = {k: v for k, v in SLURM.items() if k != missing}
    assert_one_line_error(lambda: read_launch_env(env), missing)


def test_slurm_without_nodelist_or_master():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert_one_line_error(lambda: read_launch_env(env), "MASTER_ADDR", "SLURM_JOB_NODELIST")


@pytest.mark.parametrize(
    "name, value",
    [("SLURM_PROCID", "a"), ("SLURM_NTASKS", "2x"), ("SLURM_LOCALID", ""), ("SLURM_JOB_ID", "12_3")],
)
def test_slurm_bad_values(name, value):
    assert_one_line_error(lambda: read_launch_env({**SLURM, name: value}), name)


def test_default_slurm_port():
    assert default_slurm_port(None) == 29500
    assert default_slurm_port("") == 29500
    assert default_slurm_port("7") == 10007
    assert default_slurm_port("50000") == 10000
    assert default_slurm_port("987654321") == 10000 + 987654321 % 50000
    assert all(10000 <= default_slurm_port(str(j)) <= 59999 for j in range(0, 200000, 997))
    assert default_slurm_port("4242") == default_slurm_port("4242")
    assert_one_line_error(lambda: default_slurm_port("abc"), "SLURM_JOB_ID", "abc")


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node001", "node001"),
        ("node[001-004,007]", "node001"),
        ("gpu-a[3,5-9],gpu-b1", "gpu-a3"),
        ("a1,b2", "a1"),
        ("rack1-n[08-10]", "rack1-n08"),
        ("node[7]", "node7"),
        ("  node[0010-0012]  ", "node0010"),
        ("r[1-2]-n[03-04]", "r1-n03"),
        ("[5-6]x,y", "5x"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "   ", ",a1", "node[", "node[]", "node[a-b]", "node]1", "node[1-"])
def test_first_slurm_host_bad(nodelist):
    assert_one_line_error(lambda: first_slurm_host(nodelist), repr(nodelist))
