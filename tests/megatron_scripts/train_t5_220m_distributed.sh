#!/bin/bash
# Megatron-LM examples/t5/train_t5_220m_distributed.sh at CPU sizes (see README.md)

export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS_PER_NODE=1
MASTER_ADDR=localhost
MASTER_PORT=${MASTER_PORT:-6000}
NUM_NODES=1
NODE_RANK=0
WORLD_SIZE=$(($GPUS_PER_NODE*$NUM_NODES))

CHECKPOINT_PATH=$1
TENSORBOARD_DIR=$2
VOCAB_FILE=$3
DATA_PATH=$4

DISTRIBUTED_ARGS="
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $NUM_NODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

T5_ARGS="
    --encoder-num-layers 2 \
    --decoder-num-layers 2 \
    --hidden-size 64 \
    --num-attention-heads 4 \
    --kv-channels 16 \
    --ffn-hidden-size 256 \
    --encoder-seq-length 64 \
    --decoder-seq-length 16 \
    --max-position-embeddings 64 \
    --micro-batch-size 2 \
    --global-batch-size 4 \
    --lr 0.0001 \
    --train-iters 4 \
    --lr-decay-iters 4 \
    --lr-decay-style linear \
    --min-lr 0.00001 \
    --weight-decay 1e-2 \
    --lr-warmup-fraction .01 \
    --clip-grad 1.0 \
    --bf16 \
    --vocab-extra-ids 100 \
    --init-method-std 0.015 \
    --transformer-impl local \
    --tensor-model-parallel-size 1 \
    --pipeline-model-parallel-size 1 \
    --attention-backend auto \
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --vocab-file $VOCAB_FILE \
    --tokenizer-type BertWordPieceCase \
    --split 949,50,1 \
"

OUTPUT_ARGS="
    --log-interval 1 \
    --tensorboard-dir ${TENSORBOARD_DIR} \
    --save-interval 2 \
    --eval-interval 2 \
    --eval-iters 1
"

torchrun $DISTRIBUTED_ARGS -m megalith pretrain --model t5 \
    $T5_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    --save $CHECKPOINT_PATH \
    --load $CHECKPOINT_PATH \
