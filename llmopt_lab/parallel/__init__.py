"""Parallel inference on torch.distributed (lesson 11): tensor, pipeline and
data parallelism, offloading to host memory, and the launcher that starts
worker processes with torchrun."""

from .comm import Comm, CommStats, device_for, init_from_env
from .data import data_parallel_generate, shard_requests
from .launch import free_port, launch, torchrun_command
from .offload import LayerStreamer, StreamedLayer, is_offloaded, offload, offload_cost
from .pipeline import StageInfo, bubble_fraction, make_stage, partition_layers, pipeline_generate
from .tensor import (RowParallelLinear, TPInfo, VocabParallelEmbedding, VocabParallelHead,
                     apply_tensor_parallel, column_split, decode_comm_bytes, is_tensor_parallel,
                     kv_heads_for_rank, row_split, split_cols_of_linear, split_rows_of_linear)

__all__ = ["Comm", "CommStats", "device_for", "init_from_env", "data_parallel_generate",
           "shard_requests", "free_port", "launch", "torchrun_command", "LayerStreamer",
           "StreamedLayer", "is_offloaded", "offload", "offload_cost", "StageInfo",
           "bubble_fraction", "make_stage", "partition_layers", "pipeline_generate",
           "RowParallelLinear", "TPInfo", "VocabParallelEmbedding", "VocabParallelHead",
           "apply_tensor_parallel", "column_split", "decode_comm_bytes", "is_tensor_parallel",
           "kv_heads_for_rank", "row_split", "split_cols_of_linear", "split_rows_of_linear"]
