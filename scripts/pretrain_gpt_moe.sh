#!/usr/bin/env bash
# Pretrain a tiny Mixtral-style mixture-of-experts GPT: 8 experts, top-2 routing with the alltoall
# dispatcher, expert parallelism 2 with tensor parallelism 2 and sequence parallelism (the experts
# are split over tp too: --expert-tensor-parallel-size defaults to tp, as in Megatron).
#
# With no arguments on a CPU machine this starts 4 processes (gloo: tp2 x dp2 for attention,
# etp2 x ep2 for the experts) and trains on the embedded default corpus, nothing downloaded; on a
# GPU node it starts one process per GPU. The model is Mixtral's shape at toy size: RMSNorm,
# rotary positions, grouped-query attention, SwiGLU experts, no biases, untied embeddings, the
# Switch Transformer balancing loss (--moe-aux-loss-coeff). DATA_PATH, MOCK_DATA, CKPT_DIR, DRY_RUN
# and the sizes work as in scripts/pretrain_gpt.sh; any argument is appended (so it overrides):
#
#   scripts/pretrain_gpt_moe.sh --train-iters 20
#   EP=1 TP=2 scripts/pretrain_gpt_moe.sh          # experts split over tp only
#   NUM_EXPERTS=4 TOPK=1 scripts/pretrain_gpt_moe.sh
#   DRY_RUN=1 scripts/pretrain_gpt_moe.sh          # print the command instead of running it
#
# Environment: those of scripts/pretrain_gpt.sh (GPUS_PER_NODE defaults to 4 here, PP to 1), and
# EP NUM_EXPERTS TOPK MOE_FFN_HIDDEN AUX_LOSS_COEFF.
set -euo pipefail

NAME="pretrain_gpt_moe.sh"
MODEL=gpt_moe
CORPUS_FLAGS=()                              # the corpus's documents
if ! command -v nvidia-smi >/dev/null 2>&1 || ! (nvidia-smi -L 2>/dev/null | grep -q '^GPU '); then
    GPUS_PER_NODE="${GPUS_PER_NODE:-4}"      # CPU: tp2 x dp2 = etp2 x ep2
fi
PP="${PP:-1}"
source "$(dirname "${BASH_SOURCE[0]}")/lib/pretrain_common.sh"

MODEL_ARGS=(
    --model gpt
    --num-layers "${NUM_LAYERS:-4}"
    --hidden-size "${HIDDEN_SIZE:-64}"
    --num-attention-heads "${NUM_HEADS:-4}"
    --group-query-attention --num-query-groups 2
    --seq-length "${SEQ_LENGTH:-64}"
    --normalization RMSNorm
    --position-embedding-type rope
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --num-experts "${NUM_EXPERTS:-8}"
    --moe-router-topk "${TOPK:-2}"
    --moe-ffn-hidden-size "${MOE_FFN_HIDDEN:-128}"
    --moe-token-dispatcher-type alltoall
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff "${AUX_LOSS_COEFF:-0.01}"
)
MODEL_PARALLEL_ARGS+=(--expert-model-parallel-size "${EP:-2}")
TRAINING_ARGS+=(--lr 1e-3)

launch "$@"
