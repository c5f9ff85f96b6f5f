"""Turns a scheduled batch into one :class:`~llmopt_lab.step.Step` and runs it (lesson 10).

The runner owns the KV pool: the block manager's ``num_blocks`` blocks plus
one *scratch* block that no sequence owns. Padding (what static batching
computes and continuous batching does not) writes its keys and values there,
so padded rows cost real compute but can never corrupt a sequence's cache.

With ``cuda_graph=True`` a step in which every sequence brings one token
(pure decode, the common case under load) is replayed from a CUDA graph of
the smallest batch-size bucket that holds it
(:class:`~llmopt_lab.graphs.GraphedDecoder`; its dummy rows write to the
scratch block); prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import torch

from ..cache import KVPool
from ..step import host_step
from .scheduler import ScheduledBatch


class ModelRunner:
    """Runs steps of ``model`` over a pool of ``num_blocks`` (+1 scratch) blocks
    of ``block_size`` slots.

    ``pool_cls``: the storage class (:class:`~llmopt_lab.cache.KVPool`, or
    :class:`~llmopt_lab.cache.pool.Int8KVPool` for int8 K/V).
    cuda_graph: replay decode-only steps of up to ``max_num_seqs`` sequences
    from CUDA graphs.

    Raises: GraphError for ``cuda_graph`` when the model is not on a CUDA
    GPU.
    """

    def __init__(self, model, num_blocks: int, block_size: int, pool_cls=KVPool,
                 pad_token_id: int = 0, cuda_graph: bool = False, max_num_seqs: int = 32):
        self.model = model
        self.block_size = block_size
        self.pool = pool_cls(model.config, num_blocks + 1, block_size, device=model.device,
                             dtype=model.dtype)
        self.scratch = num_blocks  # the extra block: padding writes here
        self.pad_token_id = pad_token_id
        self.decoder = None
        #: steps replayed from a CUDA graph (the rest ran eagerly)
        self.graph_steps = 0
        if cuda_graph:
            from ..graphs import GraphedDecoder

            GraphedDecoder.check_device(model)
            width = -(-model.config.max_position_embeddings // block_size)
            self.decoder = GraphedDecoder(model, self.pool, max_batch=max_num_seqs, max_blocks=width)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int], int]:
        """One forward of ``batch``.

        Returns (logits, rows, padding): float32 logits (R, V) after the last
        token of each sequence whose chunk reaches the end of its tokens (it
        samples a new token), ``rows``: the indices in ``batch.seqs`` of those
        sequences, in order; ``padding``: padding tokens computed.
        """
        bs, pad = self.block_size, self.pad_token_id
        chunks, starts, tables, last, rows = [], [], [], [], []
        padding, width, offset = 0, batch.padded_to, 0
        for i, (s, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = s.num_computed
            chunk = s.tokens[start:start + n]
            table = list(s.block_table)
            extra = width - n if width else 0  # static prefill: right-pad to the longest
            if extra:
                chunk = chunk + [pad] * extra
                padding += extra
                need = -(-(start + len(chunk)) // bs)
                table += [self.scratch] * (need - len(table))  # pads past the blocks: scratch
            chunks.append(chunk)
            starts.append(start)
            tables.append(table)
            if start + n == len(s.tokens):
                rows.append(i)
                last.append(offset + n - 1)  # the last real token, not the last pad
            offset += len(chunk)
        for _ in range(batch.pad_rows):  # a finished member of a static batch: one pad token
            chunks.append([pad])
            starts.append(0)
            tables.append([self.scratch])
            padding += 1
        host = host_step(chunks, starts, tables, bs)
        if (self.decoder is not None and not padding and len(last) == len(chunks)
                and max(host.num_queries) == 1 and len(chunks) <= self.decoder.buckets[-1]):
            self.graph_steps += 1  # every sequence decodes one token: replay its bucket's graph
            return self.decoder.run(host).clone(), rows, padding
        step = host.to_step(self.model.device)
        hidden = self.model.step_hidden(step, self.pool)  # (N, H)
        if not last:
            return hidden.new_empty(0, self.model.config.vocab_size, dtype=torch.float32), rows, padding
        idx = torch.tensor(last, device=hidden.device)
        return self.model.lm_head(hidden[idx]).float(), rows, padding
