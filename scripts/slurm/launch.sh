#!/usr/bin/env bash
# The body shared by the Slurm batch scripts (scripts/slurm/*.sbatch): start a single-node launch
# script such as scripts/pretrain_gpt.sh on every node of the allocation, turn Slurm's warning
# before the time limit into a checkpoint and a requeue, and pass the exit status on.
#
#   bash scripts/slurm/launch.sh scripts/pretrain_gpt.sh [megalith flags...]   (inside a batch job)
#
# The launch script stays the one source of flags: it is run as it is on each node (torchrun form),
# or once here with DRY_RUN=1 to print its command, whose megalith part every task then runs.
#
# Environment: LAUNCHER (torchrun, the default: one srun task per node running torchrun; srun: one
# srun task per GPU running megalith, which reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID itself),
# MASTER_ADDR MASTER_PORT (default: the job's first host, a port from the job id), GPUS_PER_NODE,
# PYTHON, REQUEUE (1: requeue after the time-limit warning), SRUN_ARGS (extra srun options), DRY_RUN
# (1: every task prints its command instead of running it), and the launch script's own variables
# (CKPT_DIR: no requeue unless a newer checkpoint appeared there).
# See docs/slurm.md.
set -euo pipefail

NAME="megalith-slurm"
die() { echo "${NAME}: $*" >&2; exit 1; }
note() { echo "${NAME}: $*" >&2; }

[[ $# -ge 1 ]] || die "usage: launch.sh LAUNCH_SCRIPT [flags...] (from a batch script under sbatch)"
LAUNCH_SCRIPT=$1
shift
[[ -f "${LAUNCH_SCRIPT}" ]] ||
    die "no launch script ${LAUNCH_SCRIPT} in $(pwd); submit from the repository root or set MEGALITH_DIR"
[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job (SLURM_JOB_ID is unset); submit with sbatch"
LAUNCHER="${LAUNCHER:-torchrun}"
[[ "${LAUNCHER}" == torchrun || "${LAUNCHER}" == srun ]] || die "LAUNCHER=${LAUNCHER}: use torchrun or srun"

# Installed early, so a warning that arrives while this script is still setting up is not lost.
# SIGUSR1 is our own warning (#SBATCH --signal=B:USR1@...; B: sends it to this shell only).
# SIGTERM is Slurm ending the job itself (scancel, preemption, the time limit): Slurm signals every
# process of the job, so this shell forwards nothing and only waits for srun instead of dying first.
STOP_REQUESTED=0
STOP_SENT=0
SRUN_PID=""
stop_tasks() {
    if [[ "${STOP_REQUESTED}" == 0 || "${STOP_SENT}" == 1 || -z "${SRUN_PID}" ]]; then return 0; fi
    STOP_SENT=1
    # TERM, not USR1: megalith's --exit-signal-handler listens for TERM, and torchrun forwards it.
    # Not `kill $SRUN_PID`: srun answers its own SIGTERM by killing the tasks (SIGKILL). Not
    # `scancel --full`: that signals this shell's children, srun included, the same way. A plain
    # `scancel --signal` reaches every process of the job's steps on every node, and not this one.
    note "asking every task to save a checkpoint and exit (scancel --signal=TERM ${SLURM_JOB_ID})"
    scancel --signal=TERM "${SLURM_JOB_ID}" || note "scancel failed; the tasks run on until Slurm stops them"
}
on_usr1() {
    note "SIGUSR1: the time limit is near"
    STOP_REQUESTED=1
    stop_tasks
}
on_term() {
    note "SIGTERM: Slurm is ending the job (scancel, preemption or the time limit); waiting for the tasks"
}
trap on_usr1 USR1
trap on_term TERM

NNODES_ALLOCATED="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}"
[[ -n "${NNODES_ALLOCATED}" ]] || die "SLURM_JOB_NUM_NODES/SLURM_NNODES are unset; is this a batch job?"
if [[ -n "${NNODES:-}" && "${NNODES}" != "${NNODES_ALLOCATED}" ]]; then
    note "NNODES=${NNODES} ignored: the allocation has ${NNODES_ALLOCATED} nodes (choose them with sbatch --nodes)"
fi
export NNODES="${NNODES_ALLOCATED}"

# The rendezvous: the job's first host, and a port derived from the job id exactly as megalith's
# launch_env derives it, so both forms agree and two jobs sharing a node rarely collide.
if [[ -z "${MASTER_ADDR:-}" ]]; then
    HOSTS=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}") ||
        die "scontrol show hostnames failed"
    MASTER_ADDR="${HOSTS%%$'\n'*}"   # the first line, without `| head` (which could cut scontrol off)
    [[ -n "${MASTER_ADDR}" ]] || die "no host in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'; set MASTER_ADDR"
fi
if [[ -z "${MASTER_PORT:-}" ]]; then
    [[ "${SLURM_JOB_ID}" =~ ^[0-9]+$ ]] || die "SLURM_JOB_ID=${SLURM_JOB_ID} is not a number; set MASTER_PORT"
    MASTER_PORT=$((10000 + SLURM_JOB_ID % 50000))
fi
export MASTER_ADDR MASTER_PORT
if [[ -z "${GPUS_PER_NODE:-}" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    export GPUS_PER_NODE="${SLURM_GPUS_ON_NODE}"   # else the launch script counts them (nvidia-smi)
fi
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then
    PYTHON="$(pwd)/.venv/bin/python"
fi
if [[ -n "${PYTHON:-}" ]]; then export PYTHON; fi

# NCCL and torch.distributed; each keeps a value exported by the submitting shell. Site-specific
# network settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are not guessed: export them and srun
# passes them on to every task.
# Abort a rank whose collective failed or timed out (a node died) instead of leaving the job hung
# until the time limit, so the allocation ends and a requeue can resume from the last checkpoint.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# One hardware queue per GPU: kernels then start in the order they are launched, so a collective
# issued before a GEMM really runs beside it. Megatron requires this to overlap tensor/sequence-
# parallel communication with computation; megalith's data-parallel reduction overlaps the same way.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"   # NCCL's warnings in the job log; INFO to debug the network
# torchrun forwards SIGTERM to its workers, then SIGKILLs them after this many seconds: give the
# checkpoint as long as the warning's lead (#SBATCH --signal=B:USR1@300), not torchrun's 30 s.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

# srun's own counts in the batch environment (SLURM_NTASKS, ...) would override ours: give all.
SRUN_OPTIONS=(--nodes="${NNODES}")
if [[ "${LAUNCHER}" == torchrun ]]; then
    SRUN_OPTIONS+=(--ntasks="${NNODES}" --ntasks-per-node=1)
    if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]]; then
        SRUN_OPTIONS+=(--cpus-per-task="${SLURM_CPUS_ON_NODE}")   # torchrun's workers share the node's CPUs
    fi
    # NODE_RANK is only known on the node; everything else the launch script reads is exported here.
    TASK_COMMAND=(bash -c 'NODE_RANK="${SLURM_NODEID}" exec bash "$@"' node "${LAUNCH_SCRIPT}" "$@")
else
    # The launch script's command, printed once: VAR=value ... python -m torch.distributed.run
    # TORCHRUN_OPTIONS -m megalith pretrain FLAGS. Each task runs the megalith part itself.
    PRINTED=$(DRY_RUN=1 NODE_RANK=0 bash "${LAUNCH_SCRIPT}" "$@") || die "${LAUNCH_SCRIPT} failed (see above)"
    eval "PLAN=(${PRINTED})"   # printf %q's quoting: safe to eval back into words
    ENVIRONMENT=()
    while [[ "${PLAN[0]}" == *=* ]]; do ENVIRONMENT+=("${PLAN[0]}"); PLAN=("${PLAN[@]:1}"); done
    TASK_PYTHON="${PLAN[0]}"
    PER_NODE=""
    START=""
    for ((i = 1; i < ${#PLAN[@]} - 1; i++)); do
        if [[ "${PLAN[i]}" == --nproc-per-node && -z "${PER_NODE}" ]]; then PER_NODE="${PLAN[i + 1]}"; fi
        if [[ "${PLAN[i]}" == -m && "${PLAN[i + 1]}" == megalith && -z "${START}" ]]; then START=$i; fi
    done
    [[ -n "${PER_NODE}" && -n "${START}" ]] || die "cannot read the command ${LAUNCH_SCRIPT} prints: ${PRINTED}"
    SRUN_OPTIONS+=(--ntasks="$((NNODES * PER_NODE))" --ntasks-per-node="${PER_NODE}")
    if [[ -n "${SLURM_CPUS_ON_NODE:-}" && "${SLURM_CPUS_ON_NODE}" -ge "${PER_NODE}" ]]; then
        SRUN_OPTIONS+=(--cpus-per-task="$((SLURM_CPUS_ON_NODE / PER_NODE))")
    fi
    # One failed rank leaves the others waiting in a collective: end the step at once. (Not in the
    # torchrun form: torchrun exits 1 after a requested stop too, and would cut other nodes short.)
    SRUN_OPTIONS+=(--kill-on-bad-exit=1)
    TASK_COMMAND=(env ${ENVIRONMENT[@]+"${ENVIRONMENT[@]}"} "${TASK_PYTHON}" "${PLAN[@]:START}")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        TASK_COMMAND=(bash -c 'printf "%q " "$@"; printf "\n"' print "${TASK_COMMAND[@]}")
    fi
fi
if [[ -n "${SRUN_ARGS:-}" ]]; then
    read -r -a EXTRA <<< "${SRUN_ARGS}"
    SRUN_OPTIONS+=("${EXTRA[@]}")
fi

# The newest checkpoint's iteration (megalith's tracker file), to tell whether this job got anywhere.
newest_checkpoint() {
    if [[ -n "${CKPT_DIR:-}" ]]; then cat "${CKPT_DIR}/latest_checkpointed_iteration.txt" 2>/dev/null || true; fi
}
CHECKPOINT_BEFORE=$(newest_checkpoint)

note "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${NNODES} nodes, ${LAUNCHER} form," \
     "rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
if [[ "${STOP_REQUESTED}" == 0 ]]; then
    srun "${SRUN_OPTIONS[@]}" "${TASK_COMMAND[@]}" &
    SRUN_PID=$!
    stop_tasks   # in case the warning came between starting srun and knowing its pid
    # A trapped signal ends `wait` early (status > 128): wait again until srun has really exited,
    # then once more for its own status, which bash keeps.
    while true; do
        wait "${SRUN_PID}" || true
        kill -0 "${SRUN_PID}" 2>/dev/null || break
    done
    STATUS=0
    wait "${SRUN_PID}" || STATUS=$?
else
    STATUS=0
    note "the warning came before the tasks started; nothing to stop"
fi

if [[ "${STOP_REQUESTED}" == 1 ]]; then
    # A requested stop ends with status 0 whatever srun says: torchrun exits 1 after forwarding
    # SIGTERM even when its workers saved and exited 0.
    note "the tasks stopped (srun status ${STATUS}) after the time-limit warning"
    CHECKPOINT_AFTER=$(newest_checkpoint)
    if [[ -n "${CKPT_DIR:-}" && "${CHECKPOINT_AFTER}" == "${CHECKPOINT_BEFORE}" ]]; then
        # Requeueing would only repeat the same work (e.g. --time shorter than the warning's lead).
        die "no new checkpoint in ${CKPT_DIR} (newest: iteration ${CHECKPOINT_AFTER:-none}); not requeueing"
    fi
    if [[ "${REQUEUE:-1}" == 1 ]]; then
        note "requeueing job ${SLURM_JOB_ID}: it resumes from the newest checkpoint"
        scontrol requeue "${SLURM_JOB_ID}" || die "scontrol requeue failed; was the job submitted with --requeue?"
    fi
    exit 0
fi
exit "${STATUS}"
