"""scripts/slurm/: the batch scripts (GPT, and their BERT and T5 siblings) run under a fake Slurm (no cluster here).

Stub `srun`, `scontrol`, `scancel` and `nvidia-smi` executables on PATH stand in for Slurm: the fake
srun starts its command once per task of the step, locally, with the SLURM_* variables a real step
gives each task, and records the arguments, the environment and the output of every task. With
DRY_RUN=1 each task prints its torchrun or megalith command instead of running it; the signal tests
run a stand-in Python that waits for SIGTERM.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import megalith.device
from megalith.parallel.launch_env import default_slurm_port, first_slurm_host, read_launch_env
from megalith.config.arguments import parse_pretrain_args, world_size_from_env

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "pretrain_gpt.sbatch"
SIBLINGS = {"bert": ROOT / "scripts" / "slurm" / "pretrain_bert.sbatch",
            "t5": ROOT / "scripts" / "slurm" / "pretrain_t5.sbatch"}
LAUNCH = ROOT / "scripts" / "slurm" / "launch.sh"
JOB_ID = "4242"
HOSTS = ["gpu001", "gpu002", "gpu003", "gpu004"]
NODELIST = "gpu[001-004]"
# Variables of the scripts and launchers that must not leak in from the environment running the tests.
CLEARED = ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TP", "PP", "VPP_LAYERS",
           "NUM_LAYERS", "HIDDEN_SIZE", "NUM_HEADS", "SEQ_LENGTH", "MICRO_BATCH", "GLOBAL_BATCH", "TRAIN_ITERS",
           "OUTPUT_DIR", "OMP_NUM_THREADS", "WANDB_MODE", "DATA_PATH", "TOKENIZER_TYPE", "TOKENIZER_MODEL",
           "MOCK_DATA", "CKPT_DIR", "SAVE_INTERVAL", "EXIT_SIGNAL_HANDLER", "LAUNCHER", "REQUEUE", "SRUN_ARGS",
           "MEGALITH_DIR", "DRY_RUN", "PYTHON", "RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_DEVICE_MAX_CONNECTIONS",
           "ENCODER_SEQ_LENGTH", "DECODER_SEQ_LENGTH", "VOCAB_EXTRA_IDS")

FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: runs the command once per task of the step (nodes x tasks per node), here, each with the
# variables a real step sets; records its arguments, and each task's environment, output and pid.
# Like the real one, it answers a SIGTERM of its own by killing every task (SIGKILL).
log="${FAKE_SLURM_LOG}"
trap 'echo "srun: forcing job termination" >&2; kill -KILL "${pids[@]}" 2>/dev/null' TERM
printf '%q ' "$@" >> "${log}/srun.args"; printf '\n' >> "${log}/srun.args"
nodes="${SLURM_NNODES}"; per_node="${SLURM_NTASKS_PER_NODE:-1}"
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --nodes=*) nodes="${1#*=}" ;;
        --ntasks-per-node=*) per_node="${1#*=}" ;;
    esac
    shift
done
read -r -a hosts <<< "${FAKE_SLURM_HOSTS}"
pids=()
for ((node = 0; node < nodes; node++)); do
    for ((local = 0; local < per_node; local++)); do
        task=$((node * per_node + local))
        (
            export SLURM_NODEID=${node} SLURM_PROCID=${task} SLURM_LOCALID=${local} SLURM_STEP_ID=0
            export SLURM_NTASKS=$((nodes * per_node)) SLURM_STEP_NUM_TASKS=$((nodes * per_node))
            export SLURM_NTASKS_PER_NODE=${per_node} SLURMD_NODENAME=${hosts[node]}
            env -0 > "${log}/task-${task}.env"
            exec "$@" > "${log}/task-${task}.out" 2> "${log}/task-${task}.err"
        ) &
        pids+=($!)
        echo $! >> "${log}/srun.pids"
    done
done
status=0
for pid in "${pids[@]}"; do
    wait "${pid}" || { code=$?; if ((code > status)); then status=${code}; fi; }
done
exit "${status}"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# Fake scontrol: expands the job's node list (only that one) and records requeues.
printf '%q ' "$@" >> "${FAKE_SLURM_LOG}/scontrol.args"; printf '\n' >> "${FAKE_SLURM_LOG}/scontrol.args"
case "$1 ${2:-}" in
    "show hostnames") [[ "${3:-}" == "${SLURM_JOB_NODELIST}" ]] || exit 3; printf '%s\n' ${FAKE_SLURM_HOSTS} ;;
    "requeue ${SLURM_JOB_ID}") ;;
    *) exit 2 ;;
esac
"""

FAKE_SCANCEL = r"""#!/usr/bin/env bash
# Fake scancel --signal=SIG JOB: Slurm signals every process of the job's steps (not the batch shell).
printf '%q ' "$@" >> "${FAKE_SLURM_LOG}/scancel.args"; printf '\n' >> "${FAKE_SLURM_LOG}/scancel.args"
sig=""
for arg in "$@"; do case "${arg}" in --signal=*) sig="${arg#*=}" ;; esac; done
[[ -n "${sig}" ]] || exit 2
while read -r pid; do kill -s "${sig}" "${pid}" 2>/dev/null || true; done < "${FAKE_SLURM_LOG}/srun.pids"
"""

# Stands in for torchrun (or megalith) on a node: records its arguments, then waits for SIGTERM,
# after which it "saves" (writes megalith's tracker file, unless FAKE_SAVES=0) and exits with
# FAKE_EXIT_ON_TERM (torchrun: 1 even when its workers saved; megalith: 0).
FAKE_PYTHON = r"""#!/usr/bin/env bash
log="${FAKE_SLURM_LOG}"; me="${SLURM_PROCID}"
on_term() {
    echo TERM >> "${log}/python-${me}.signals"
    if [[ "${FAKE_SAVES:-1}" == 1 ]]; then
        mkdir -p "${CKPT_DIR}" && echo 120 > "${CKPT_DIR}/latest_checkpointed_iteration.txt"
    fi
    exit "${FAKE_EXIT_ON_TERM}"
}
trap on_term TERM
printf '%q ' "$@" > "${log}/python-${me}.args"
touch "${log}/python-${me}.started"
while true; do sleep 0.05; done
"""


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setattr(megalith.device, "cuda_available", lambda: False)


def write_tool(directory: Path, name: str, text: str) -> None:
    tool = directory / name
    tool.write_text(text)
    tool.chmod(0o755)


class FakeSlurm:
    """A fake Slurm job of `nodes` nodes with `gpus` GPUs each (0: no GPU, nvidia-smi fails)."""

    def __init__(self, tmp_path: Path, nodes: int = 4, gpus: int = 8, sbatch: Path = SBATCH, **env: str):
        self.sbatch = sbatch
        self.log = tmp_path / "slurm"
        self.log.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        write_tool(bin_dir, "srun", FAKE_SRUN)
        write_tool(bin_dir, "scontrol", FAKE_SCONTROL)
        write_tool(bin_dir, "scancel", FAKE_SCANCEL)
        write_tool(bin_dir, "python-stand-in", FAKE_PYTHON)
        smi = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:04d})'\n" for i in range(gpus))
        write_tool(bin_dir, "nvidia-smi", "#!/bin/sh\n" + (smi or "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n"))
        self.stand_in = str(bin_dir / "python-stand-in")
        self.nodes = nodes
        self.env = {k: v for k, v in os.environ.items()
                    if k not in CLEARED and not k.startswith(("SLURM_", "NCCL_", "TORCH_NCCL_", "TORCH_ELASTIC_"))}
        self.env.update({
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable, "DRY_RUN": "1",
            "MOCK_DATA": "1", "OUTPUT_DIR": str(tmp_path / "run"), "FAKE_SLURM_LOG": str(self.log),
            "FAKE_SLURM_HOSTS": " ".join(HOSTS[:nodes]), "FAKE_EXIT_ON_TERM": "0",
            # what sbatch gives the batch script (the first node's view of the job)
            "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "megalith-gpt", "SLURM_SUBMIT_DIR": str(ROOT),
            "SLURM_JOB_NODELIST": NODELIST if nodes == 4 else f"gpu[001-{nodes:03d}]",
            "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes),
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_CPUS_ON_NODE": "64", "SLURM_RESTART_COUNT": "0",
        })
        if gpus:
            self.env["SLURM_GPUS_ON_NODE"] = str(gpus)
        self.env.update(env)
        self.cwd = tmp_path

    def popen(self, *args: str) -> subprocess.Popen:
        """The batch script in the background, in a process group of its own (with its tasks)."""
        return subprocess.Popen(["bash", str(self.sbatch), *args], env=self.env, cwd=self.cwd, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def submit(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", str(self.sbatch), *args], env=self.env, cwd=self.cwd, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == expect, done.stderr
        return done

    def lines(self, tool: str) -> list[list[str]]:
        path = self.log / f"{tool}.args"
        return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []

    def tasks(self) -> int:
        return len(list(self.log.glob("task-*.env")))

    def task_env(self, task: int) -> dict[str, str]:
        pairs = (self.log / f"task-{task}.env").read_text().split("\0")
        return dict(pair.split("=", 1) for pair in pairs if pair)

    def task_command(self, task: int) -> tuple[dict[str, str], list[str]]:
        """(variables set in front, words) of the command task `task` printed."""
        out = (self.log / f"task-{task}.out").read_text()
        assert out.count("\n") == 1, (out, (self.log / f"task-{task}.err").read_text())
        words = shlex.split(out)
        if words[0] == "env":
            words.pop(0)
        settings = {}
        while "=" in words[0]:
            name, value = words.pop(0).split("=", 1)
            settings[name] = value
        return settings, words


def megalith_flags(words: list[str]) -> tuple[list[str], list[str]]:
    """(everything before `-m megalith pretrain`, megalith's flags)."""
    split = next(i for i in range(len(words) - 2) if words[i:i + 3] == ["-m", "megalith", "pretrain"])
    return words[:split], words[split + 3:]


def torchrun_node_flags(slurm: FakeSlurm, port: str, ckpt: str) -> list[str]:
    """The torchrun form on a 4-node, 8-GPU job submitted with --bf16: each node's torchrun has its
    node rank and the first node as rendezvous, and all run the same megalith flags (returned),
    ending with the checkpoint flags for `ckpt` and the script's arguments."""
    flag_sets = []
    for node in range(4):
        settings, words = slurm.task_command(node)
        assert settings == {"WANDB_MODE": "offline"}  # GPUs: no gloo, no OMP_NUM_THREADS
        launcher, flags = megalith_flags(words)
        assert launcher == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "4",
                            "--node-rank", str(node), "--master-addr", HOSTS[0], "--master-port", port]
        assert flags[-8:] == ["--save", ckpt, "--load", ckpt, "--save-interval", "1000", "--exit-signal-handler",
                              "--bf16"]
        flag_sets.append(flags)
    assert all(flags == flag_sets[0] for flags in flag_sets)
    return flag_sets[0]


def test_scripts_parse_as_bash():
    for script in (SBATCH, LAUNCH, *SIBLINGS.values()):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("sbatch", [SBATCH, *SIBLINGS.values()], ids=lambda path: path.stem)
def test_header_asks_for_whole_nodes_a_warning_and_requeue(sbatch):
    lines = sbatch.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    # sbatch reads #SBATCH lines only before the first command
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    header = [line.split(None, 1)[1] for line in lines[:first_command] if line.startswith("#SBATCH")]
    options = dict(option.lstrip("-").split("=", 1) if "=" in option else (option.lstrip("-"), "")
                   for option in header)
    assert all(not line.startswith("#SBATCH") for line in lines[first_command:])
    assert options["ntasks-per-node"] == "1" and options["nodes"] == "2" and options["gpus-per-node"] == "8"
    assert {"exclusive", "requeue", "time", "output"} <= set(options)
    assert options["job-name"] == "megalith-" + sbatch.stem.removeprefix("pretrain_")
    assert options["open-mode"] == "append"  # a requeued job keeps its log
    lead = re.fullmatch(r"B:USR1@(\d+)", options["signal"])
    assert lead, options["signal"]  # to the batch shell only: it decides to requeue
    # torchrun may wait as long for its workers' checkpoint as the warning leaves
    assert f'TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{lead.group(1)}' in LAUNCH.read_text()


def test_torchrun_form_one_task_per_node(tmp_path):
    slurm = FakeSlurm(tmp_path, TP="2", PP="2", GLOBAL_BATCH="64")
    done = slurm.submit("--bf16")
    port = str(10000 + int(JOB_ID) % 50000)
    assert port == str(default_slurm_port(JOB_ID))  # as megalith derives it under srun alone
    assert f"4 nodes, torchrun form, rendezvous gpu001:{port}" in done.stderr
    (srun,) = slurm.lines("srun")
    assert srun[:5] == ["--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=64", "bash"]
    assert "--kill-on-bad-exit=1" not in srun
    assert slurm.lines("scontrol") == [["show", "hostnames", NODELIST]]
    assert slurm.tasks() == 4
    ckpt = str(tmp_path / "run" / "checkpoints")
    flags = torchrun_node_flags(slurm, port, ckpt)
    for node in range(4):
        env = slurm.task_env(node)
        assert (env["SLURM_NODEID"], env["SLURMD_NODENAME"]) == (str(node), HOSTS[node])
        assert (env["TORCH_NCCL_ASYNC_ERROR_HANDLING"], env["CUDA_DEVICE_MAX_CONNECTIONS"]) == ("1", "1")
        assert (env["NCCL_DEBUG"], env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) == ("WARN", "300")
        assert "NCCL_SOCKET_IFNAME" not in env  # site-specific: never guessed
    config = parse_pretrain_args([*flags, "--distributed-backend", "gloo"], world_size=32)
    assert (config.distributed.tensor_model_parallel_size, config.distributed.pipeline_model_parallel_size,
            config.layout.dp, config.num_micro_batches) == (2, 2, 8, 4)  # 64 / (2 x dp 8)
    checkpointing = config.checkpointing
    assert (checkpointing.save, checkpointing.load, checkpointing.save_interval) == (ckpt, ckpt, 1000)
    assert checkpointing.exit_signal_handler and config.model.params_dtype == "bf16"
    assert config.logging.log_json == str(tmp_path / "run" / "log.jsonl")


def test_srun_form_one_task_per_gpu_read_by_megalith(tmp_path):
    slurm = FakeSlurm(tmp_path, nodes=2, gpus=4, LAUNCHER="srun", TP="2", PP="2", VPP_LAYERS="1",
                      GLOBAL_BATCH="8", MICRO_BATCH="1")
    done = slurm.submit()
    assert "2 nodes, srun form" in done.stderr
    (srun,) = slurm.lines("srun")
    assert srun[:5] == ["--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=16",
                        "--kill-on-bad-exit=1"]
    assert slurm.tasks() == 8
    port = default_slurm_port(JOB_ID)
    flag_sets = []
    for task in range(8):
        settings, words = slurm.task_command(task)
        assert settings == {"WANDB_MODE": "offline"}
        launcher, flags = megalith_flags(words)
        assert launcher == [sys.executable] and "torch.distributed.run" not in words  # no torchrun
        flag_sets.append(flags)
        env = slurm.task_env(task)
        assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(env)  # else megalith would take torchrun's path
        launch = read_launch_env(env)
        assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", task, 8, task % 4)
        assert (launch.master_addr, launch.master_port) == (HOSTS[0], port)
    assert all(flags == flag_sets[0] for flags in flag_sets)
    assert world_size_from_env(slurm.task_env(0)) == 8  # SLURM_NTASKS, as WORLD_SIZE is absent
    config = parse_pretrain_args([*flag_sets[0], "--distributed-backend", "gloo"], world_size=8)
    assert (config.layout.dp, config.layout.vpp, config.num_micro_batches) == (2, 4, 4)
    assert config.checkpointing.exit_signal_handler


def test_srun_form_on_cpu_nodes_uses_gloo_and_one_thread(tmp_path):
    slurm = FakeSlurm(tmp_path, nodes=2, gpus=0, LAUNCHER="srun", TP="1", PP="1", GLOBAL_BATCH="32",
                      SAVE_INTERVAL="0", CKPT_DIR=str(tmp_path / "my ckpt"))
    slurm.submit()
    assert slurm.lines("srun")[0][1:3] == ["--ntasks=16", "--ntasks-per-node=8"]  # the script's CPU default
    settings, words = slurm.task_command(15)
    assert settings == {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    config = parse_pretrain_args(megalith_flags(words)[1], world_size=16)
    assert (config.distributed.distributed_backend, config.layout.dp) == ("gloo", 16)
    assert (config.checkpointing.save, config.checkpointing.save_interval) == (str(tmp_path / "my ckpt"), None)


def test_environment_overrides(tmp_path):
    slurm = FakeSlurm(tmp_path, nodes=2, MASTER_ADDR="10.0.0.7", MASTER_PORT="29400", GPUS_PER_NODE="4",
                      NNODES="16", NCCL_SOCKET_IFNAME="ib0", TORCH_NCCL_ASYNC_ERROR_HANDLING="3",
                      CUDA_DEVICE_MAX_CONNECTIONS="8", SRUN_ARGS="--label --cpu-bind=none", EXIT_SIGNAL_HANDLER="0",
                      SAVE_INTERVAL="50", MOCK_DATA="0", DATA_PATH="data/a_text_document",
                      TOKENIZER_MODEL="tok.model")
    done = slurm.submit()
    assert "NNODES=16 ignored: the allocation has 2 nodes" in done.stderr
    assert slurm.lines("scontrol") == []  # MASTER_ADDR given: no lookup
    assert slurm.lines("srun")[0][4:7] == ["--label", "--cpu-bind=none", "bash"]
    settings, words = slurm.task_command(1)
    launcher, flags = megalith_flags(words)
    assert launcher[3:] == ["--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr",
                            "10.0.0.7", "--master-port", "29400"]
    env = slurm.task_env(1)
    assert (env["NCCL_SOCKET_IFNAME"], env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]) == ("ib0", "3")
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"
    assert "--exit-signal-handler" not in flags and flags[flags.index("--save-interval") + 1] == "50"
    assert flags[flags.index("--data-path") + 1] == "data/a_text_document"


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_ID": ""}, "not inside a Slurm job"),
    ({"LAUNCHER": "mpirun"}, "LAUNCHER=mpirun: use torchrun or srun"),
    ({"MEGALITH_DIR": "/"}, "is not the megalith repository"),
])
def test_refuses_with_one_line(tmp_path, env, message):
    slurm = FakeSlurm(tmp_path, **env)
    done = slurm.submit(expect=1)
    assert message in done.stderr and done.stderr.count("\n") == 1
    assert slurm.lines("srun") == []


def stop_group(job: subprocess.Popen) -> None:
    """Whatever is left of a background batch script and its tasks (none when the test passed)."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("launcher, exit_on_term, requeue", [("torchrun", "1", "1"), ("srun", "0", "0")])
def test_time_limit_warning_saves_and_requeues(tmp_path, launcher, exit_on_term, requeue):
    """SIGUSR1 to the batch shell (--signal=B:USR1@...) -> SIGTERM to every task through scancel,
    not through srun (which would SIGKILL them) -> status 0 and scontrol requeue (unless REQUEUE=0)."""
    slurm = FakeSlurm(tmp_path, nodes=2, gpus=2, LAUNCHER=launcher, TP="1", PP="1", DRY_RUN="0",
                      FAKE_EXIT_ON_TERM=exit_on_term, REQUEUE=requeue)
    slurm.env["PYTHON"] = slurm.stand_in
    tasks = 2 if launcher == "torchrun" else 4
    job = slurm.popen()
    try:
        wait_for(lambda: len(list(slurm.log.glob("python-*.started"))) == tasks)
        job.send_signal(signal.SIGUSR1)
        out, err = job.communicate(timeout=20)
    finally:
        stop_group(job)
    assert job.returncode == 0, err
    assert slurm.lines("scancel") == [["--signal=TERM", JOB_ID]]
    for task in range(tasks):
        assert (slurm.log / f"python-{task}.signals").read_text() == "TERM\n"
    assert f"srun status {exit_on_term}" in err
    requeues = [line for line in slurm.lines("scontrol") if line[0] == "requeue"]
    assert requeues == ([["requeue", JOB_ID]] if requeue == "1" else [])
    started = shlex.split((slurm.log / "python-0.args").read_text())
    assert started[:2] == (["-m", "torch.distributed.run"] if launcher == "torchrun" else ["-m", "megalith"])


def test_no_requeue_without_a_new_checkpoint(tmp_path):
    """A warning that leaves no newer checkpoint (the tracker still says 100) would requeue forever."""
    slurm = FakeSlurm(tmp_path, nodes=2, gpus=2, TP="1", PP="1", DRY_RUN="0", FAKE_SAVES="0")
    slurm.env["PYTHON"] = slurm.stand_in
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("100\n")
    job = slurm.popen()
    try:
        wait_for(lambda: len(list(slurm.log.glob("python-*.started"))) == 2)
        job.send_signal(signal.SIGUSR1)
        _, err = job.communicate(timeout=20)
    finally:
        stop_group(job)
    assert job.returncode == 1 and f"no new checkpoint in {ckpt} (newest: iteration 100); not requeueing" in err
    assert [line[0] for line in slurm.lines("scontrol")] == ["show"]


def test_slurm_ending_the_job_is_waited_for_not_requeued(tmp_path):
    """SIGTERM (scancel, preemption, the limit itself) reaches the tasks from Slurm; the batch shell
    must outlive them rather than die first, and leaves requeueing to Slurm."""
    slurm = FakeSlurm(tmp_path, nodes=2, gpus=2, TP="1", PP="1", DRY_RUN="0", FAKE_EXIT_ON_TERM="1")
    slurm.env["PYTHON"] = slurm.stand_in
    job = slurm.popen()
    try:
        wait_for(lambda: len(list(slurm.log.glob("python-*.started"))) == 2)
        job.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert job.poll() is None  # still waiting for its tasks
        for pid in (slurm.log / "srun.pids").read_text().split():
            os.kill(int(pid), signal.SIGTERM)  # what Slurm does to every process of the step
        out, err = job.communicate(timeout=20)
    finally:
        stop_group(job)
    assert job.returncode == 1, err  # srun's status, passed on
    assert "SIGTERM: Slurm is ending the job" in err
    assert slurm.lines("scancel") == [] and [line[0] for line in slurm.lines("scontrol")] == ["show"]


def test_both_forms_meet_where_megalith_alone_would():
    assert first_slurm_host(NODELIST) == HOSTS[0]  # what scontrol show hostnames lists first


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_until_warning(tmp_path: Path) -> tuple[FakeSlurm, int]:
    """megalith itself under the fake srun (srun form: 2 nodes x 1 CPU task, gloo), warned once it
    has logged; returns the job and the iteration of the checkpoint it saved."""
    env = dict(LAUNCHER="srun", DRY_RUN="0", GPUS_PER_NODE="1", TP="1", PP="1", NUM_LAYERS="2", HIDDEN_SIZE="32",
               NUM_HEADS="2", SEQ_LENGTH="16", MICRO_BATCH="1", GLOBAL_BATCH="2", TRAIN_ITERS="100000",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WANDB_MODE="disabled")
    slurm = FakeSlurm(tmp_path, nodes=2, gpus=0, **env)
    log = tmp_path / "run" / "log.jsonl"
    job = slurm.popen()
    try:
        wait_for(lambda: log.exists() and log.read_text(), timeout=120)  # iteration 10 is logged
        job.send_signal(signal.SIGUSR1)
        _, err = job.communicate(timeout=120)
    finally:
        stop_group(job)
    assert job.returncode == 0, err
    assert "srun status 0" in err and [line[0] for line in slurm.lines("scontrol")] == ["requeue"]
    saved = int((tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    last_rank = (slurm.log / "task-1.out").read_text()
    assert saved >= 10 and f"exiting at iteration {saved} (SIGTERM)" in last_rank, last_rank
    return slurm, saved


def test_real_run_saves_on_the_warning(tmp_path):
    """The time-limit warning reaches megalith's ranks as SIGTERM: both save and exit 0, the job is requeued."""
    run_until_warning(tmp_path)


@pytest.mark.full
def test_requeued_job_resumes_from_the_warning_checkpoint(tmp_path):
    slurm, saved = run_until_warning(tmp_path)
    # Slurm starts the requeued job again under the same id; --exit-interval 5 ends it soon.
    for path in slurm.log.iterdir():
        path.unlink()
    slurm.env.update(SLURM_RESTART_COUNT="1", MASTER_PORT=str(free_port()))
    done = slurm.submit("--exit-interval", "5")
    assert "(restart 1)" in done.stderr
    resumed = int((tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text())
    assert saved < resumed <= saved + 5 and resumed % 5 == 0  # from 0 it would have stopped at 5
    assert f"exiting at iteration {resumed} (--exit-interval 5)" in (slurm.log / "task-1.out").read_text()


# --- the BERT and T5 siblings: the same launch.sh, their own launch script -------------------------


@pytest.mark.parametrize("model", ["bert", "t5"])
def test_siblings_torchrun_form_runs_their_launch_script_on_every_node(tmp_path, model):
    slurm = FakeSlurm(tmp_path, sbatch=SIBLINGS[model], TP="2", PP="2", GLOBAL_BATCH="64")
    del slurm.env["OUTPUT_DIR"]  # the sibling's own default: runs/<model>, checkpoints beneath
    done = slurm.submit("--bf16")
    port = str(default_slurm_port(JOB_ID))
    assert f"4 nodes, torchrun form, rendezvous gpu001:{port}" in done.stderr
    (srun,) = slurm.lines("srun")
    assert srun[:5] == ["--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=64", "bash"]
    assert srun[5:9] == ["-c", 'NODE_RANK="${SLURM_NODEID}" exec bash "$@"', "node", f"scripts/pretrain_{model}.sh"]
    flags = torchrun_node_flags(slurm, port, f"runs/{model}/checkpoints")
    config = parse_pretrain_args([*flags, "--distributed-backend", "gloo"], world_size=32)
    assert config.training.model == model and config.model.params_dtype == "bf16"
    assert (config.distributed.tensor_model_parallel_size, config.distributed.pipeline_model_parallel_size,
            config.layout.dp, config.num_micro_batches) == (2, 2, 8, 4)
    assert config.logging.log_json == f"runs/{model}/log.jsonl"


@pytest.mark.parametrize("model", ["bert", "t5"])
def test_siblings_srun_form_one_task_per_gpu(tmp_path, model):
    slurm = FakeSlurm(tmp_path, nodes=2, gpus=4, sbatch=SIBLINGS[model], LAUNCHER="srun", TP="2", PP="2",
                      GLOBAL_BATCH="8", MICRO_BATCH="1")
    done = slurm.submit()
    assert "2 nodes, srun form" in done.stderr
    (srun,) = slurm.lines("srun")
    assert srun[:5] == ["--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=16",
                        "--kill-on-bad-exit=1"]
    flag_sets = []
    for task in range(8):
        settings, words = slurm.task_command(task)
        launcher, flags = megalith_flags(words)
        assert settings == {"WANDB_MODE": "offline"} and launcher == [sys.executable]
        launch = read_launch_env(slurm.task_env(task))
        assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", task, 8, task % 4)
        flag_sets.append(flags)
    assert all(flags == flag_sets[0] for flags in flag_sets)
    assert flags[flags.index("--model") + 1] == model
    config = parse_pretrain_args([*flags, "--distributed-backend", "gloo"], world_size=8)
    assert (config.training.model, config.layout.dp, config.num_micro_batches) == (model, 2, 4)
    assert config.checkpointing.save == str(tmp_path / "run" / "checkpoints")


def test_t5_sibling_passes_its_data_and_sentinels(tmp_path):
    slurm = FakeSlurm(tmp_path, nodes=2, gpus=4, sbatch=SIBLINGS["t5"], LAUNCHER="srun", MOCK_DATA="0",
                      DATA_PATH="data/a_text_sentence", TOKENIZER_MODEL="tok.model", ENCODER_SEQ_LENGTH="512",
                      DECODER_SEQ_LENGTH="128")
    slurm.submit()
    flags = megalith_flags(slurm.task_command(7)[1])[1]
    start = flags.index("--data-path")
    assert flags[start:start + 8] == ["--data-path", "data/a_text_sentence", "--tokenizer-type",
                                      "SentencePieceTokenizer", "--tokenizer-model", "tok.model",
                                      "--vocab-extra-ids", "100"]
    assert flags[flags.index("--encoder-seq-length") + 1] == "512"
    assert flags[flags.index("--decoder-seq-length") + 1] == "128"
