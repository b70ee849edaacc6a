# What scripts/pretrain_{gpt,bert,t5}.sh share, sourced by them (not run on its own): the
# environment -> torchrun's arguments, the parallel layout, the data, checkpoint, training and
# logging flags, and `launch`, which prints (DRY_RUN=1) or runs the command.
#
# The sourcing script sets NAME (for its error messages), MODEL (gpt, bert, t5: the run directory
# and the wandb names) and CORPUS_FLAGS (how `megalith corpus --print-flags` is asked: sentences
# for BERT and T5), then after sourcing adds MODEL_ARGS and its own flags to the arrays below.
# Every variable read here is listed in the launch scripts' headers and in docs/training.md.

fail() {
    echo "${NAME}: $*" >&2
    exit 1
}

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

# GPUs that nvidia-smi lists on this node (0 without a driver or without nvidia-smi).
NUM_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
fi

if [[ "${NUM_GPUS}" -gt 0 ]]; then
    GPUS_PER_NODE="${GPUS_PER_NODE:-${NUM_GPUS}}"
    DEVICE_ARGS=()
else
    GPUS_PER_NODE="${GPUS_PER_NODE:-8}"     # CPU processes, time-sharing the cores
    DEVICE_ARGS=(--distributed-backend gloo)
    export OMP_NUM_THREADS=1               # one intra-op thread per process
fi
TP="${TP:-2}"
PP="${PP:-2}"

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6000}"
OUTPUT_DIR="${OUTPUT_DIR:-./runs/${MODEL}}"
export WANDB_MODE="${WANDB_MODE:-offline}"  # set WANDB_MODE=online to upload
ENVIRONMENT=("WANDB_MODE=${WANDB_MODE}")
if [[ -n "${OMP_NUM_THREADS:-}" ]]; then
    ENVIRONMENT=("OMP_NUM_THREADS=${OMP_NUM_THREADS}" "${ENVIRONMENT[@]}")
fi

DISTRIBUTED_ARGS=(
    --nproc-per-node "${GPUS_PER_NODE}"
    --nnodes "${NNODES}"
    --node-rank "${NODE_RANK}"
    --master-addr "${MASTER_ADDR}"
    --master-port "${MASTER_PORT}"
)

# Checkpoints only when asked for: CKPT_DIR is both where to save and where to resume from (a run
# with no checkpoint there yet starts fresh), so rerunning or requeueing the same command continues.
# With a directory to save to, SIGTERM (what Slurm sends before a kill) saves and exits 0 unless
# EXIT_SIGNAL_HANDLER=0; SAVE_INTERVAL=0 saves only at the end and on SIGTERM.
CHECKPOINT_ARGS=()
if [[ ! "${EXIT_SIGNAL_HANDLER:-1}" =~ ^[01]$ ]]; then
    fail "EXIT_SIGNAL_HANDLER=${EXIT_SIGNAL_HANDLER} must be 0 or 1"
fi
if [[ -n "${CKPT_DIR:-}" ]]; then
    CHECKPOINT_ARGS=(--save "${CKPT_DIR}" --load "${CKPT_DIR}")
    if [[ "${SAVE_INTERVAL:-1000}" != "0" ]]; then
        CHECKPOINT_ARGS+=(--save-interval "${SAVE_INTERVAL:-1000}")
    fi
    if [[ "${EXIT_SIGNAL_HANDLER:-1}" == "1" ]]; then
        CHECKPOINT_ARGS+=(--exit-signal-handler)
    fi
elif [[ -n "${SAVE_INTERVAL:-}" || "${EXIT_SIGNAL_HANDLER:-0}" == "1" ]]; then
    fail "SAVE_INTERVAL or EXIT_SIGNAL_HANDLER=1 needs CKPT_DIR (where checkpoints go)"
fi

# Data: the embedded corpus unless DATA_PATH (your preprocessed data) or MOCK_DATA=1 is given.
if [[ "${MOCK_DATA:-0}" == "1" ]]; then
    DATA_ARGS=(--mock-data --vocab-size 512)
elif [[ -n "${DATA_PATH:-}" ]]; then
    DATA_ARGS=(--data-path ${DATA_PATH} --tokenizer-type "${TOKENIZER_TYPE:-SentencePieceTokenizer}")
    if [[ -n "${TOKENIZER_MODEL:-}" ]]; then
        DATA_ARGS+=(--tokenizer-model "${TOKENIZER_MODEL}")
    fi
else
    DATA_ARGS=()
    while IFS= read -r word; do
        DATA_ARGS+=("${word}")
    done < <("${PYTHON}" -m megalith corpus --print-flags ${CORPUS_FLAGS[@]+"${CORPUS_FLAGS[@]}"})
    if [[ "${#DATA_ARGS[@]}" -eq 0 ]]; then
        fail "building the default corpus failed (see above); set DATA_PATH or MOCK_DATA=1"
    fi
    DATA_ARGS+=(--split 949,50,1)
fi

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP}"
    --pipeline-model-parallel-size "${PP}"
    ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"}  # empty on GPU nodes (safe under set -u on old bash too)
)
if [[ "${TP}" -gt 1 ]]; then
    MODEL_PARALLEL_ARGS+=(--sequence-parallel)
fi

TRAINING_ARGS=(
    --train-iters "${TRAIN_ITERS:-100}"
    --micro-batch-size "${MICRO_BATCH:-2}"
    --global-batch-size "${GLOBAL_BATCH:-16}"
    --min-lr 1e-4
    --lr-warmup-iters 10
    --lr-decay-style cosine
    --weight-decay 0.01
    --clip-grad 1.0
    --eval-interval 50
    --eval-iters 2
)

LOGGING_ARGS=(
    --log-interval 10
    --log-json "${OUTPUT_DIR}/log.jsonl"
    --tensorboard-dir "${OUTPUT_DIR}/tensorboard"
    --wandb-project "megalith-${MODEL}"
    --wandb-exp-name "tiny-${MODEL}"
    --wandb-save-dir "${OUTPUT_DIR}/wandb"
)

# launch [megalith flags...]: torchrun with every flag above and the script's own arguments last
# (so they override); with DRY_RUN=1 the command is printed, with the variables set in front.
launch() {
    local args=("${MODEL_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}"
                "${LOGGING_ARGS[@]}" ${CHECKPOINT_ARGS[@]+"${CHECKPOINT_ARGS[@]}"})
    local command=("${PYTHON}" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" -m megalith pretrain "${args[@]}" "$@")
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        printf '%q ' "${ENVIRONMENT[@]}" "${command[@]}"
        printf '\n'
        exit 0
    fi
    exec "${command[@]}"
}
