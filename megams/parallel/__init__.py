"""Parallelism applied to the plain models from outside: layout and groups (`dims`), communication
primitives (`mappings`), tensor-parallel layers (`layers`), vocab-parallel loss (`cross_entropy`)
and dropout streams (`random`)."""
from megams.parallel.cross_entropy import vocab_parallel_cross_entropy
from megams.parallel.dims import DeepSpeedMPU, ParallelDims, build_parallel_dims, padded_vocab
from megams.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    column_parallel_linear)
from megams.parallel.mappings import (copy_to_tp, count_comm, gather_from_sp, gather_from_tp, reduce_from_tp,
                                      reduce_scatter_to_sp, scatter_to_sp, scatter_to_tp)
from megams.parallel.random import get_rng_tracker, seed_parallel_rng

__all__ = ["ParallelDims", "DeepSpeedMPU", "build_parallel_dims", "padded_vocab",
           "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
           "scatter_to_sp", "gather_from_sp", "reduce_scatter_to_sp", "count_comm",
           "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "column_parallel_linear",
           "vocab_parallel_cross_entropy", "get_rng_tracker", "seed_parallel_rng"]
