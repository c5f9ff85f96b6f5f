"""Tensor parallelism as a transform on a finished model (Megatron-LM's split).

``apply_tensor_parallel(model, comm)`` keeps, on rank r of p, the r-th slice
of every weight and inserts the two all-reduces per decoder block that put
the slices back together:

* **column-parallel** q/k/v and gate/up: ``W`` (N, K) is split by *output*
  rows, ``W_r = W[r N/p : (r+1) N/p]``. Each rank computes its own heads and
  its own MLP columns from the full input: no communication.
* **row-parallel** o_proj and down_proj: ``W`` is split by *input* columns,
  ``W_r = W[:, r K/p : (r+1) K/p]``; rank r multiplies its slice of the
  activation (which is exactly what its column-parallel half produced) and
  the partial outputs are summed: ``y = sum_r x_r W_r^T`` (one all-reduce of
  (tokens, hidden) per block half). The bias is added once (rank 0).
* **vocabulary-parallel** embedding and head: rank r holds vocabulary rows
  ``[r V/p, (r+1) V/p)``. A lookup is zero for ids outside the slice, and
  the all-reduce sums the one non-zero row; the head computes its slice of
  the logits and an all-gather puts the vocabulary back together, so every
  rank samples the same token from the same full logits.

Attention heads: with p <= num_kv_heads, rank r keeps query heads
``[r Hq/p, (r+1) Hq/p)`` and the KV heads they read. With p > num_kv_heads
(p a multiple of it) the KV heads are *replicated*: rank r keeps KV head
``r // (p / Hkv)``, which every one of its query heads reads.

The model's ``config`` becomes the per-rank shape (heads, KV heads, MLP
width divided by p), so a KV cache built from it is the per-rank cache: its
size per rank is ``num_kv_heads / p`` (or 1 when replicated) of the whole.
Weight formats: ``nn.Linear``, int8 weight-only (:class:`Int8Linear`) and
int4 (:class:`Int4Linear`) where every row-parallel slice holds whole
groups. Anything else raises ParallelError rather than computing something
else.

One decode step of B tokens moves, per rank, 2 all-reduces of (B, hidden)
per block, one for the embedding and an all-gather of (B, V / p) logits:
:func:`decode_comm_bytes` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ParallelError
from ..transforms.quantize.formats import Int4Weight, Int8Weight
from ..transforms.quantize.layers import Int4Linear, Int8Linear
from .comm import Comm

__all__ = ["apply_tensor_parallel", "column_split", "row_split", "split_rows_of_linear",
           "split_cols_of_linear", "RowParallelLinear", "VocabParallelEmbedding",
           "VocabParallelHead", "TPInfo", "kv_heads_for_rank", "decode_comm_bytes",
           "is_tensor_parallel"]


# --------------------------------------------------------------- by hand
def _check_rank_world(rank, world, what: str = "rank") -> None:
    """ParallelError unless ``world`` is a positive integer and ``rank`` an
    integer in 0..world-1 (a rank outside would get an empty or wrong shard)."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ParallelError(f"the parallel degree (world size) must be a positive integer, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ParallelError(f"{what} must be an integer in 0..{world - 1} (one per process of the "
                            f"group), got {rank!r}")


def column_split(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s output rows of ``weight`` (N, K): (N / world, K).

    Raises ParallelError when N is not a multiple of ``world``, for a
    ``world`` below 1 or a ``rank`` outside 0..world-1."""
    _check_rank_world(rank, world)
    N = weight.shape[0]
    if N % world:
        raise ParallelError(f"cannot split {N} output features over {world} ranks evenly")
    n = N // world
    return weight[rank * n:(rank + 1) * n]


def row_split(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s input columns of ``weight`` (N, K): (N, K / world).

    Raises ParallelError when K is not a multiple of ``world``, for a
    ``world`` below 1 or a ``rank`` outside 0..world-1."""
    _check_rank_world(rank, world)
    K = weight.shape[1]
    if K % world:
        raise ParallelError(f"cannot split {K} input features over {world} ranks evenly")
    k = K // world
    return weight[:, rank * k:(rank + 1) * k]


# ------------------------------------------------------ slicing any linear
def split_rows_of_linear(linear: nn.Module, rows: slice) -> nn.Module:
    """A new layer computing only output features ``rows`` of ``linear``
    (column parallelism). nn.Linear, Int8Linear and Int4Linear.

    Raises: ParallelError for other layer types."""
    if type(linear) is nn.Linear:
        w = linear.weight.detach()[rows].clone()
        out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if linear.bias is not None:
                out.bias.copy_(linear.bias.detach()[rows])
        return out.requires_grad_(linear.weight.requires_grad)
    bias = None if linear.bias is None else linear.bias[rows]
    if type(linear) is Int8Linear:
        w = Int8Weight(linear.qweight_t[:, rows].t().contiguous(), linear.scales[rows].clone())
        return Int8Linear(w, bias, linear.input_scale, backend=linear.backend)
    if type(linear) is Int4Linear:
        w = Int4Weight(linear.packed[:, rows].contiguous(), linear.scales[:, rows].contiguous(),
                       linear.zeros[:, rows].contiguous(), linear.group_size)
        return Int4Linear(w, bias, linear.input_scale, backend=linear.backend, bits=linear.bits)
    raise ParallelError(f"tensor parallelism supports nn.Linear, Int8Linear and Int4Linear, "
                        f"not {type(linear).__name__}: apply it before other transforms or "
                        "undo them (e.g. unfuse) first")


def split_cols_of_linear(linear: nn.Module, cols: slice, keep_bias: bool) -> nn.Module:
    """A new layer multiplying only input features ``cols`` of ``linear``
    (row parallelism); its bias is kept only when ``keep_bias`` (rank 0), so
    that the all-reduce adds it once. Int4 needs ``cols`` on group
    boundaries. Raises ParallelError otherwise or for other layer types."""
    if type(linear) is nn.Linear:
        w = linear.weight.detach()[:, cols].clone()
        has_bias = keep_bias and linear.bias is not None
        out = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if has_bias:
                out.bias.copy_(linear.bias.detach())
        return out.requires_grad_(linear.weight.requires_grad)
    bias = linear.bias if keep_bias else None
    in_scale = None if linear.input_scale is None else linear.input_scale[cols]
    if type(linear) is Int8Linear:
        w = Int8Weight(linear.qweight_t[cols].t().contiguous(), linear.scales.clone())
        return Int8Linear(w, bias, in_scale, backend=linear.backend)
    if type(linear) is Int4Linear:
        g = linear.group_size
        start, stop = cols.start, cols.stop
        if start % g or stop % g:
            raise ParallelError(
                f"int4 with group size {g}: a row-parallel slice of input features {start}:{stop} "
                f"cuts a quantization group; use a tensor-parallel degree that divides "
                f"{linear.in_features // g} groups, or a smaller group size")
        w = Int4Weight(linear.packed[start // 2:stop // 2].contiguous(),
                       linear.scales[start // g:stop // g].contiguous(),
                       linear.zeros[start // g:stop // g].contiguous(), g)
        return Int4Linear(w, bias, in_scale, backend=linear.backend, bits=linear.bits)
    raise ParallelError(f"tensor parallelism supports nn.Linear, Int8Linear and Int4Linear, "
                        f"not {type(linear).__name__}")


# ---------------------------------------------------------------- modules
class RowParallelLinear(nn.Module):
    """``inner`` (a slice of the input features) followed by an all-reduce:
    x (..., K / p) -> (..., N), the same on every rank.

    Raises: ParallelError from the collective when the group fails; nothing
    of its own."""

    def __init__(self, inner: nn.Module, comm: Comm):
        super().__init__()
        self.inner, self.comm = inner, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.inner(x))

    def extra_repr(self) -> str:
        return f"all_reduce over {self.comm.world_size} ranks"


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V/p)`` of an embedding; ids (...) -> (..., hidden)
    after an all-reduce (each id's row lives on exactly one rank).

    Raises: ParallelError from the collective when the group fails; ids
    outside the full vocabulary are the caller's to refuse
    (:func:`~llmopt_lab.generate.check_token_ids`)."""

    def __init__(self, weight: torch.Tensor, start: int, vocab_size: int, comm: Comm):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.vocab_size, self.comm = start, vocab_size, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.weight.shape[0]
        local = ids - self.start
        mine = (local >= 0) & (local < n)
        out = F.embedding(local.clamp(0, n - 1), self.weight) * mine[..., None].to(self.weight.dtype)
        return self.comm.all_reduce(out)

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.start + self.weight.shape[0]} of {self.vocab_size}"


class VocabParallelHead(nn.Module):
    """The logits of vocabulary slice r, gathered: x (..., hidden) -> (..., V).

    Raises: ParallelError from the collective when the group fails (see
    :class:`~llmopt_lab.parallel.Comm`); nothing of its own."""

    def __init__(self, inner: nn.Module, comm: Comm):
        super().__init__()
        self.inner, self.comm = inner, comm

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(self.inner(x), dim=-1)


@dataclass
class TPInfo:
    """What :func:`apply_tensor_parallel` did on this rank.

    Raises: nothing; a plain record."""

    rank: int
    world_size: int
    kv_replicated: bool
    full_config: object  # the ModelConfig before sharding


def is_tensor_parallel(model: nn.Module) -> bool:
    """True for a model :func:`apply_tensor_parallel` has sharded. Raises: nothing."""
    return getattr(model, "tensor_parallel", None) is not None


def kv_heads_for_rank(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[slice, slice]:
    """(query heads, KV heads) that rank ``rank`` of ``world`` keeps.

    Raises ParallelError when the heads cannot be split evenly: query heads
    must be a multiple of ``world``; KV heads a multiple of ``world``, or
    ``world`` a multiple of the KV heads (then each KV head is replicated on
    ``world / num_kv_heads`` ranks); also for a ``world`` below 1 or a
    ``rank`` outside 0..world-1."""
    _check_rank_world(rank, world)
    if num_heads % world:
        raise ParallelError(f"{num_heads} query heads cannot be split over {world} ranks: "
                            f"choose a degree that divides {num_heads}")
    hq = num_heads // world
    q = slice(rank * hq, (rank + 1) * hq)
    if num_kv_heads % world == 0:
        hk = num_kv_heads // world
        return q, slice(rank * hk, (rank + 1) * hk)
    if world % num_kv_heads:
        raise ParallelError(f"{num_kv_heads} KV heads cannot be split or replicated over {world} "
                            f"ranks: the degree must divide them or be a multiple of them")
    kv = rank // (world // num_kv_heads)
    return q, slice(kv, kv + 1)


def _check_model(model) -> None:
    from ..model import Attention, MLP, Transformer

    if not isinstance(model, Transformer):
        raise ParallelError(f"apply_tensor_parallel takes an llmopt_lab Transformer, "
                            f"got {type(model).__name__}")
    if is_tensor_parallel(model):
        raise ParallelError("this model is already tensor parallel")
    for i, layer in enumerate(model.layers):
        if type(layer.self_attn) is not Attention or type(layer.mlp) is not MLP:
            raise ParallelError(
                f"layer {i} is {type(layer.self_attn).__name__}/{type(layer.mlp).__name__}, not the "
                "plain Attention/MLP: apply tensor parallelism to the plain model (unfuse first)")


@torch.no_grad()
def apply_tensor_parallel(model, comm: Comm):
    """Shard ``model`` in place for rank ``comm.rank`` of ``comm.world_size``
    and return it (see the module doc for the split).

    Every rank must call it on the same model (same weights). Afterwards
    ``model(...)``, :func:`llmopt_lab.generate.generate` and the engine run
    as before; each rank computes its share and the collectives make every
    rank's logits the full, identical logits. ``model.config`` is the
    per-rank shape; ``model.tensor_parallel`` records the original.

    Raises ParallelError when heads, KV heads, MLP width or vocabulary do not
    split over the degree, for layer types it cannot slice, for an int4
    row-parallel slice that would cut a group, when applied twice, or for a
    ``comm`` that is not a :class:`Comm` with a rank in 0..world_size-1.
    """
    _check_model(model)
    if not isinstance(comm, Comm):
        raise ParallelError(f"apply_tensor_parallel needs a Comm (init_from_env() under torchrun, or "
                            f"Comm.single()), got {type(comm).__name__}")
    _check_rank_world(comm.rank, comm.world_size, "comm.rank")
    cfg = model.config
    p, r = comm.world_size, comm.rank
    if cfg.vocab_size % p:
        raise ParallelError(f"vocabulary of {cfg.vocab_size} cannot be split over {p} ranks")
    D = cfg.head_dim
    per_layer_heads, per_layer_width = [], []
    plans = []
    for i, layer in enumerate(model.layers):
        a = layer.self_attn
        q_heads, kv_heads = kv_heads_for_rank(a.num_heads, a.num_kv_heads, r, p)
        width = layer.mlp.gate_proj.out_features
        if width % p:
            raise ParallelError(f"layer {i}: MLP width {width} cannot be split over {p} ranks")
        plans.append((q_heads, kv_heads, width // p))
    for i, (layer, (q_heads, kv_heads, w)) in enumerate(zip(model.layers, plans)):
        a, m = layer.self_attn, layer.mlp
        qs = slice(q_heads.start * D, q_heads.stop * D)
        ks = slice(kv_heads.start * D, kv_heads.stop * D)
        a.q_proj = split_rows_of_linear(a.q_proj, qs)
        a.k_proj = split_rows_of_linear(a.k_proj, ks)
        a.v_proj = split_rows_of_linear(a.v_proj, ks)
        a.o_proj = RowParallelLinear(split_cols_of_linear(a.o_proj, qs, keep_bias=r == 0), comm)
        a.num_heads = q_heads.stop - q_heads.start
        a.num_kv_heads = kv_heads.stop - kv_heads.start
        ms = slice(r * w, (r + 1) * w)
        m.gate_proj = split_rows_of_linear(m.gate_proj, ms)
        m.up_proj = split_rows_of_linear(m.up_proj, ms)
        m.down_proj = RowParallelLinear(split_cols_of_linear(m.down_proj, ms, keep_bias=r == 0), comm)
        per_layer_heads.append(a.num_heads)
        per_layer_width.append(w)
    v = cfg.vocab_size // p
    rows = slice(r * v, (r + 1) * v)
    tied = model.lm_head.weight is model.embed_tokens.weight
    emb = VocabParallelEmbedding(model.embed_tokens.weight.detach()[rows].clone(), r * v,
                                 cfg.vocab_size, comm)
    if tied:
        head = nn.Linear(cfg.hidden_size, v, bias=False, device=emb.weight.device, dtype=emb.weight.dtype)
        head.weight = emb.weight
    else:
        head = split_rows_of_linear(model.lm_head, rows)
    model.embed_tokens = emb
    model.lm_head = VocabParallelHead(head, comm)
    kv_local = plans[0][1].stop - plans[0][1].start
    model.tensor_parallel = TPInfo(r, p, kv_replicated=cfg.num_kv_heads % p != 0, full_config=cfg)
    uniform_h = len(set(per_layer_heads)) == 1
    uniform_w = len(set(per_layer_width)) == 1
    model.config = cfg.replace(
        num_heads=per_layer_heads[0] if uniform_h else max(per_layer_heads),
        num_kv_heads=kv_local, head_dim=D,
        intermediate_size=per_layer_width[0] if uniform_w else max(per_layer_width),
        layer_num_heads=None if uniform_h else tuple(per_layer_heads),
        layer_intermediate_sizes=None if uniform_w else tuple(per_layer_width),
        name=f"{cfg.name} (tensor parallel, rank {r} of {p})")
    return model


def decode_comm_bytes(config, batch: int, world: int, bytes_per_element: float = 4.0) -> dict:
    """What one decode step of ``batch`` tokens hands to the collectives, per
    rank, under tensor parallelism of degree ``world`` (config: the full model).

    Returns a dict: ``all_reduce_calls`` (2 per layer + 1 for the embedding),
    ``all_reduce_bytes`` (the payload: batch x hidden per call),
    ``all_gather_bytes`` (batch x V / world logits), and ``ring_bytes_sent``:
    what a ring all-reduce actually sends per rank, 2 (p - 1) / p of the
    payload (reduce-scatter then all-gather), plus (p - 1) / p of the
    gathered logits. Raises ParallelError for a ``world`` below 1 or a
    negative ``batch``."""
    _check_rank_world(0, world)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ParallelError(f"batch must be an integer >= 0 (tokens per decode step), got {batch!r}")
    calls = 2 * config.num_layers + 1
    payload = calls * batch * config.hidden_size * bytes_per_element
    gather = batch * config.vocab_size / world * bytes_per_element
    ring = 2 * (world - 1) / world * payload + (world - 1) * gather
    return {"all_reduce_calls": calls, "all_reduce_bytes": payload, "all_gather_bytes": gather,
            "ring_bytes_sent": ring}
