#!/usr/bin/env bash
# Pretrain a tiny T5 with megalith: tp2 x pp2 x dp2, sequence parallel; span corruption with sentinels.
#
# With no arguments on a CPU machine this starts 8 processes (gloo) and trains on the embedded
# default corpus, split into sentences (Python's own documentation, tokenized with a SentencePiece
# model trained on it, plus 100 sentinels <extra_id_0> ... from --vocab-extra-ids; built once by
# `megalith corpus`: nothing is downloaded); on a GPU node it starts one process per GPU. DATA_PATH
# and TOKENIZER_MODEL train on your own data (from `megalith preprocess --split-sentences`),
# MOCK_DATA=1 on synthetic tokens. The pipeline puts the encoder on the first stage and the decoder
# on the second (2 + 2 layers); T5 has no interleaved schedule. Every size can be changed through
# the environment, and any argument given to this script is appended to megalith's (so it overrides):
#
#   TP=1 PP=1 scripts/pretrain_t5.sh --train-iters 20
#   GPUS_PER_NODE=4 NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 scripts/pretrain_t5.sh --bf16
#   DATA_PATH=data/my_text_sentence TOKENIZER_MODEL=tok.model scripts/pretrain_t5.sh
#   MOCK_DATA=1 scripts/pretrain_t5.sh       # synthetic tokens
#   DRY_RUN=1 scripts/pretrain_t5.sh          # print the command instead of running it
#   CKPT_DIR=ckpt scripts/pretrain_t5.sh      # save to and resume from ckpt; SIGTERM saves and exits 0
#
# Environment: GPUS_PER_NODE NNODES NODE_RANK MASTER_ADDR MASTER_PORT TP PP NUM_LAYERS (per stack)
# HIDDEN_SIZE NUM_HEADS ENCODER_SEQ_LENGTH DECODER_SEQ_LENGTH MICRO_BATCH GLOBAL_BATCH TRAIN_ITERS
# OUTPUT_DIR PYTHON DRY_RUN DATA_PATH TOKENIZER_TYPE TOKENIZER_MODEL VOCAB_EXTRA_IDS MOCK_DATA
# (MEGALITH_DATA_CACHE: where the corpus is built) CKPT_DIR SAVE_INTERVAL EXIT_SIGNAL_HANDLER
# (checkpoints: none unless CKPT_DIR is set).
set -euo pipefail

NAME="pretrain_t5.sh"
MODEL=t5
CORPUS_FLAGS=(--sentences)                   # T5 samples are runs of a document's sentences
source "$(dirname "${BASH_SOURCE[0]}")/lib/pretrain_common.sh"

if [[ -n "${VPP_LAYERS:-}" ]]; then
    fail "VPP_LAYERS=${VPP_LAYERS}: T5 has no interleaved pipeline schedule; unset VPP_LAYERS"
fi

MODEL_ARGS=(
    --model t5
    --num-layers "${NUM_LAYERS:-2}"          # encoder layers, and as many decoder layers
    --hidden-size "${HIDDEN_SIZE:-64}"
    --num-attention-heads "${NUM_HEADS:-4}"
    --encoder-seq-length "${ENCODER_SEQ_LENGTH:-64}"
    --decoder-seq-length "${DECODER_SEQ_LENGTH:-32}"
)
# T5 samples need a tokenizer with bos, eos and padding (megalith's SentencePiece tokenizer has
# them) and sentinels: VOCAB_EXTRA_IDS of them (100, as Megatron's T5) are added to its vocabulary.
if [[ "${MOCK_DATA:-0}" != "1" ]]; then
    DATA_ARGS+=(--vocab-extra-ids "${VOCAB_EXTRA_IDS:-100}")
fi
TRAINING_ARGS+=(--lr 1e-2 --mask-prob 0.15 --short-seq-prob 0.1)   # T5's usual higher rate

launch "$@"
