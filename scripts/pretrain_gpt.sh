#!/usr/bin/env bash
# Pretrain a tiny GPT with megalith: tp2 x pp2 (interleaved, 2 virtual stages) x dp2, sequence parallel.
#
# With no arguments on a CPU machine this starts 8 processes (gloo) and trains on the embedded
# default corpus (Python's own documentation, tokenized with a SentencePiece model trained on it,
# built once by `megalith corpus`: nothing is downloaded); on a GPU node it starts one process
# per GPU. DATA_PATH and TOKENIZER_MODEL train on your own data (from `megalith preprocess`),
# MOCK_DATA=1 on synthetic tokens. Every size can be changed through the environment, and any
# argument given to this script is appended to megalith's (so it overrides):
#
#   TP=1 PP=1 scripts/pretrain_gpt.sh --train-iters 20
#   GPUS_PER_NODE=4 NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 scripts/pretrain_gpt.sh --bf16
#   DATA_PATH=data/my_text_document TOKENIZER_MODEL=tok.model scripts/pretrain_gpt.sh
#   MOCK_DATA=1 scripts/pretrain_gpt.sh       # synthetic tokens
#   DRY_RUN=1 scripts/pretrain_gpt.sh          # print the command instead of running it
#   CKPT_DIR=ckpt scripts/pretrain_gpt.sh      # save to and resume from ckpt; SIGTERM saves and exits 0
#
# Environment: GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT TP PP VPP_LAYERS NUM_LAYERS
# HIDDEN_SIZE NUM_HEADS SEQ_LENGTH MICRO_BATCH GLOBAL_BATCH TRAIN_ITERS OUTPUT_DIR PYTHON DRY_RUN
# DATA_PATH TOKENIZER_TYPE TOKENIZER_MODEL MOCK_DATA (MEGALITH_DATA_CACHE: where the corpus is built)
# CKPT_DIR SAVE_INTERVAL EXIT_SIGNAL_HANDLER (checkpoints: none unless CKPT_DIR is set).
set -euo pipefail

NAME="pretrain_gpt.sh"
MODEL=gpt
CORPUS_FLAGS=()                              # the corpus's documents
source "$(dirname "${BASH_SOURCE[0]}")/lib/pretrain_common.sh"

MODEL_ARGS=(
    --model gpt
    --num-layers "${NUM_LAYERS:-8}"
    --hidden-size "${HIDDEN_SIZE:-64}"
    --num-attention-heads "${NUM_HEADS:-4}"
    --seq-length "${SEQ_LENGTH:-64}"
)
if [[ "${PP}" -gt 1 ]]; then   # interleaved 1F1B: num-layers / (PP x VPP_LAYERS) virtual stages per rank
    MODEL_PARALLEL_ARGS+=(--num-layers-per-virtual-pipeline-stage "${VPP_LAYERS:-2}")
fi
TRAINING_ARGS+=(--lr 1e-3)

launch "$@"
