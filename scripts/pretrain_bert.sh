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
MODEL=bert
CORPUS_FLAGS=(--sentences)                   # BERT samples are runs of a document's sentences
source "$(dirname "${BASH_SOURCE[0]}")/lib/pretrain_common.sh"

# BERT samples need a tokenizer with [CLS] [SEP] [MASK] and padding (megalith's SentencePiece
# tokenizer adds them; a Hugging Face BERT tokenizer directory has them).
MODEL_ARGS=(
    --model bert
    --num-layers "${NUM_LAYERS:-4}"
    --hidden-size "${HIDDEN_SIZE:-64}"
    --num-attention-heads "${NUM_HEADS:-4}"
    --seq-length "${SEQ_LENGTH:-64}"
)
if [[ "${PP}" -gt 1 && -n "${VPP_LAYERS:-}" ]]; then   # interleaved 1F1B only when asked for
    MODEL_PARALLEL_ARGS+=(--num-layers-per-virtual-pipeline-stage "${VPP_LAYERS}")
fi
TRAINING_ARGS+=(--lr 1e-3 --mask-prob 0.15 --short-seq-prob 0.1)

launch "$@"
