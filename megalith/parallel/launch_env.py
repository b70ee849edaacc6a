"""Where this process sits in the job, read from the launcher's environment variables.

Pure parsing of a mapping (pass ``os.environ`` at the call site), so every launcher's
layout can be tested without launching anything. Recognised, in order:

- torchrun (``RANK`` is set): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
- Slurm ``srun`` (``SLURM_PROCID`` is set): the SLURM_* task variables; the rendezvous is
  the first node of the job unless MASTER_ADDR/MASTER_PORT say otherwise.
- neither: a single process on this machine.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from megalith.errors import ConfigError

DEFAULT_PORT = 29500
_SLURM_PORT_BASE = 10000
_SLURM_PORT_SPAN = 50000
# One bracket of a Slurm hostlist: comma-separated numbers or number ranges.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_BRACKET = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job and where the ranks meet."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def _required(env: Mapping[str, str], name: str, launcher: str, signal: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{launcher} launch ({signal} is set) is missing {name}; set {name} too, or unset {signal}")
    return value


def _integer(name: str, value: str, minimum: int) -> int:
    # Stricter than int(): no "1_000", no non-ASCII digits, which no launcher writes.
    if not _INTEGER.fullmatch(value.strip()):
        raise ConfigError(f"{name}={value!r} is not an integer; set {name} to a whole number")
    number = int(value)
    if number < minimum:
        raise ConfigError(f"{name}={number} is below {minimum}; set {name} to a whole number >= {minimum}")
    return number


def _port(name: str, value: str) -> int:
    port = _integer(name, value, 1)
    if port > 65535:
        raise ConfigError(f"{name}={port} is not a TCP port; set {name} to a number in 1..65535")
    return port


def first_slurm_host(nodelist: str) -> str:
    """The first host of a compressed Slurm hostlist, e.g. "node[007-009],gpu1" -> "node007"."""
    text = nodelist.strip()
    parts: list[str] = []
    i = 0
    while i < len(text) and text[i] != ",":
        if text[i] == "[":
            end = text.find("]", i)
            inner = text[i + 1 : end] if end >= 0 else ""
            if end < 0 or not _BRACKET.fullmatch(inner):
                raise ConfigError(f"cannot parse Slurm node list {nodelist!r}; expect e.g. 'node[001-004,007]'")
            parts.append(re.match(r"[0-9]+", inner).group())  # type: ignore[union-attr]
            i = end + 1
        elif text[i] == "]":
            raise ConfigError(f"cannot parse Slurm node list {nodelist!r}: unmatched ']'; expect e.g. 'node[001-004]'")
        else:
            parts.append(text[i])
            i += 1
    host = "".join(parts).strip()
    if not host:
        raise ConfigError(f"Slurm node list {nodelist!r} names no host; set SLURM_JOB_NODELIST or MASTER_ADDR")
    return host


def default_slurm_port(job_id: str | None) -> int:
    """A rendezvous port derived from the job id, so jobs sharing a node rarely collide."""
    if job_id is None or not job_id.strip():
        return DEFAULT_PORT
    number = _integer("SLURM_JOB_ID", job_id, 0)
    return _SLURM_PORT_BASE + number % _SLURM_PORT_SPAN


def _checked(rank: int, world_size: int, local_rank: int, addr: str, port: int, launcher: str) -> LaunchEnv:
    if rank >= world_size:
        raise ConfigError(f"{launcher} rank {rank} is not below world size {world_size}; check the launcher's task count")
    return LaunchEnv(rank, world_size, local_rank, addr, port, launcher)


def read_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    """Parse torchrun's or Slurm's variables; a plain single process when neither is present."""
    if "RANK" in env:
        get = {name: _required(env, name, "torchrun", "RANK")
               for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        return _checked(
            _integer("RANK", get["RANK"], 0),
            _integer("WORLD_SIZE", get["WORLD_SIZE"], 1),
            _integer("LOCAL_RANK", get["LOCAL_RANK"], 0),
            get["MASTER_ADDR"],
            _port("MASTER_PORT", get["MASTER_PORT"]),
            "torchrun",
        )
    if "SLURM_PROCID" in env:
        def task_int(name: str, minimum: int) -> int:
            return _integer(name, _required(env, name, "slurm", "SLURM_PROCID"), minimum)

        rank, world_size = task_int("SLURM_PROCID", 0), task_int("SLURM_NTASKS", 1)
        local_rank = task_int("SLURM_LOCALID", 0)
        addr = env.get("MASTER_ADDR", "").strip()
        if not addr:
            nodelist = env.get("SLURM_JOB_NODELIST", "").strip() or env.get("SLURM_NODELIST", "").strip()
            if not nodelist:
                raise ConfigError(
                    "slurm environment has neither MASTER_ADDR nor SLURM_JOB_NODELIST/SLURM_NODELIST; "
                    "run under srun or set MASTER_ADDR"
                )
            addr = first_slurm_host(nodelist)
        port_text = env.get("MASTER_PORT", "").strip()
        port = _port("MASTER_PORT", port_text) if port_text else default_slurm_port(env.get("SLURM_JOB_ID"))
        return _checked(rank, world_size, local_rank, addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", DEFAULT_PORT, "single")
