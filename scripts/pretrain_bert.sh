#!/usr/bin/env bash
# Pretrain a tiny BERT with megalith: tp2 x pp2 x dp2, sequence parallel; masked LM + sentence order.
#
# With no arguments on a CPU machine this starts 8 processes (gloo) and trains on the embedded
# default corpus, split into sentences (Python's own documentation, tokenized with a SentencePiece
# model trained on it that has BERT's [CLS] [SEP] [MASK] <pad>; built once by `megalith corpus`:
# nothing is downloaded); on a GPU node it starts one process per GPU. DATA_PATH and
# TOKENIZER_MODEL train on your own data (`megalith preprocess --split-sentences`, so that samples
# are pairs of sentence runs), MOCK_DATA=1 on synthetic tokens. Every size can be changed through
# the environment, and any argument given to this script is appended to megalith's (so it overrides):
#
#   TP=1 PP=1 scripts/pretrain_bert.sh --train-iters 20
#   GPUS_PER_NODE=4 NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 scripts/pretrain_bert.sh --bf16
#   DATA_PATH=data/my_text_sentence TOKENIZER_MODEL=tok.model scripts/pretrain_bert.sh
#   DATA_PATH=data/wiki_text_sentence TOKENIZER_TYPE=HuggingFaceTokenizer TOKENIZER_MODEL=bert-base-uncased/ \
#       scripts/pretrain_bert.sh                # a Hugging Face tokenizer directory
#   MOCK_DATA=1 scripts/pretrain_bert.sh       # synthetic tokens
#   DRY_RUN=1 scripts/pretrain_bert.sh          # print the command instead of running it
#   CKPT_DIR=ckpt scripts/pretrain_bert.sh      # save to and resume from ckpt; SIGTERM saves and exits 0
#   scripts/pretrain_bert.sh --bert-no-binary-head   # masked LM only (BERT samples of one segment)
#
# Environment: GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT TP PP VPP_LAYERS NUM_LAYERS
# HIDDEN_SIZE NUM_HEADS SEQ_LENGTH MICRO_BATCH GLOBAL_BATCH TRAIN_ITERS OUTPUT_DIR PYTHON DRY_RUN
# DATA_PATH TOKENIZER_TYPE TOKENIZER_MODEL MOCK_DATA (MEGALITH_DATA_CACHE: where the corpus
# is built) CKPT_DIR SAVE_INTERVAL EXIT_SIGNAL_HANDLER (checkpoints: none unless CKPT_DIR is set).
set -euo pipefail

NAME="pretrain_bert.sh"
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
OUTPUT_DIR="${OUTPUT_DIR:-./runs/bert}"
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

BERT_MODEL_ARGS=(
    --model bert
    --num-layers "${NUM_LAYERS:-4}"
    --hidden-size "${HIDDEN_SIZE:-64}"
    --num-attention-heads "${NUM_HEADS:-4}"
    --seq-length "${SEQ_LENGTH:-64}"
)

# Checkpoints only when asked for: CKPT_DIR is both where to save and where to resume from (a run
# with no checkpoint there yet starts fresh), so rerunning or requeueing the same command continues.
# With a directory to save to, SIGTERM (what Slurm sends before a kill) saves and exits 0 unless
# EXIT_SIGNAL_HANDLER=0; SAVE_INTERVAL=0 saves only at the end and on SIGTERM.
CHECKPOINT_ARGS=()
if [[ ! "${EXIT_SIGNAL_HANDLER:-1}" =~ ^[01]$ ]]; then
    echo "${NAME}: EXIT_SIGNAL_HANDLER=${EXIT_SIGNAL_HANDLER} must be 0 or 1" >&2
    exit 1
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
    echo "${NAME}: SAVE_INTERVAL or EXIT_SIGNAL_HANDLER=1 needs CKPT_DIR (where checkpoints go)" >&2
    exit 1
fi

# Data: the embedded corpus's sentences unless DATA_PATH (your preprocessed data) or MOCK_DATA=1.
# BERT samples need a tokenizer with [CLS] [SEP] [MASK] and padding (megalith's SentencePiece
# tokenizer adds them; a Hugging Face BERT tokenizer directory has them).
if [[ "${MOCK_DATA:-0}" == "1" ]]; then
    DATA_ARGS=(--mock-data --vocab-size 512)
elif [[ -n "${DATA_PATH:-}" ]]; then
    DATA_ARGS=(--data-path ${DATA_PATH} --tokenizer-type "${TOKENIZER_TYPE:-SentencePieceTokenizer}")
    if [[ -n "${TOKENIZER_MODEL:-}" ]]; then
        DATA_ARGS+=(--tokenizer-model "${TOKENIZER_MODEL}")
    fi
else
    DATA_ARGS=()
    while IFS= read -r word; do DATA_ARGS+=("${word}"); done < <("${PYTHON}" -m megalith corpus --print-flags --sentences)
    if [[ "${#DATA_ARGS[@]}" -eq 0 ]]; then
        echo "${NAME}: building the default corpus failed (see above); set DATA_PATH or MOCK_DATA=1" >&2
        exit 1
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
if [[ "${PP}" -gt 1 && -n "${VPP_LAYERS:-}" ]]; then   # interleaved 1F1B only when asked for
    MODEL_PARALLEL_ARGS+=(--num-layers-per-virtual-pipeline-stage "${VPP_LAYERS}")
fi

TRAINING_ARGS=(
    --train-iters "${TRAIN_ITERS:-100}"
    --micro-batch-size "${MICRO_BATCH:-2}"
    --global-batch-size "${GLOBAL_BATCH:-16}"
    --lr 1e-3
    --min-lr 1e-4
    --lr-warmup-iters 10
    --lr-decay-style cosine
    --weight-decay 0.01
    --clip-grad 1.0
    --mask-prob 0.15
    --short-seq-prob 0.1
    --eval-interval 50
    --eval-iters 2
)

LOGGING_ARGS=(
    --log-interval 10
    --log-json "${OUTPUT_DIR}/log.jsonl"
    --tensorboard-dir "${OUTPUT_DIR}/tensorboard"
    --wandb-project megalith-bert
    --wandb-exp-name tiny-bert
    --wandb-save-dir "${OUTPUT_DIR}/wandb"
)

ARGS=("${BERT_MODEL_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${LOGGING_ARGS[@]}"
      ${CHECKPOINT_ARGS[@]+"${CHECKPOINT_ARGS[@]}"})
COMMAND=("${PYTHON}" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" -m megalith pretrain "${ARGS[@]}" "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then   # the command, with the variables this script sets in front
    printf '%q ' "${ENVIRONMENT[@]}" "${COMMAND[@]}"
    printf '\n'
    exit 0
fi
exec "${COMMAND[@]}"
