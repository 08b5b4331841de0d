"""Causal attention for training batches, without an attention mask.

A training batch needs no mask. Its rows are right-padded, so under causal attention a real
token only ever sees the real tokens before it (padding sits after them and carries no loss);
or they are packed, several samples to a row, each of which must see only itself. transformers
expresses both as a [B, 1, T, T] mask, and SDPA with a mask leaves its fused causal kernels
(flash attention on CUDA, the blocked causal kernel on the CPU) for a path that scores every
query against every key of the row: a packed row of 512 tokens pays 512^2 scores per head where
its five samples of ~100 would pay 5 x 100^2. Finding a packed row from its position ids also
reads the device (`find_packed_sequence_indices`), a host sync in every step.

`SEGMENTED` is an attention implementation (transformers' AttentionInterface) that takes the
segments from the batch instead, as lengths counted on the host when the batch was made
(`Batch.segments`), and runs SDPA's causal kernel on each segment alone: the varlen
attention of flash-attention, written as a loop. On a CUDA GPU in half precision the whole
batch goes to torch's own varlen kernel instead (`torch.nn.attention.varlen`, flash
attention): one launch per layer over every segment, where the loop launches one per sample.
transformers builds no mask for an implementation it has no mask function for, so a model set
to it must only see right-padded or packed rows: `use_segmented_attention` sets a model to it
for a run (training/setup.py).
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Sequence

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SEGMENTED = "llava_tune_segmented"

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover  (torch before 2.9: the loop below)
    varlen_attn = None
if varlen_attn is not None and not {"scale", "window_size", "enable_gqa"} <= set(
        inspect.signature(varlen_attn).parameters):
    varlen_attn = None  # the first versions' arguments (no scale, no GQA): the loop below


def segmented_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segments: Sequence[Sequence[int]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of each row.

    query [B, H, T, D], key and value [B, Hkv, T, D] -> ([B, T, H, D], None).
    `segments`: per row, the lengths of its samples in order, summing to T (a packed row; its
    padding is a segment of its own); None: each row is one causal sequence (right padding).
    """
    if attention_mask is not None:
        raise ValueError(f"{SEGMENTED} attention takes no mask: it is for training batches "
                         "(right-padded or packed rows) only")
    kwargs.pop("is_causal", None)
    if segments is None:  # traced by train.compile, checkpointed layers included
        return _causal(module, query, key, value, dropout, scaling, **kwargs), None
    return _packed(module, query, key, value, dropout, scaling, segments, **kwargs), None


def _causal(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, dropout: float, scaling: float | None,
            **kwargs) -> torch.Tensor:
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout,
                                  scaling=scaling, is_causal=True, **kwargs)[0]


@torch.compiler.disable  # train.compile: one graph per distinct set of segments otherwise
def _packed(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, dropout: float, scaling: float | None,
            segments: Sequence[Sequence[int]], **kwargs) -> torch.Tensor:
    if len(segments) != query.shape[0]:
        raise ValueError(f"{len(segments)} rows of segments for a batch of {query.shape[0]}")
    for row, lengths in enumerate(segments):
        if sum(lengths) != query.shape[2]:
            raise ValueError(f"row {row}'s segments cover {sum(lengths)} positions of "
                             f"{query.shape[2]}")
    if dropout == 0.0 and varlen_fits(query):
        return _varlen(query, key, value, segments, scaling)
    # Rows by unbind and samples by split, not by indexing: their backward passes are one
    # stack and one cat, where each indexed slice's backward would write its gradient into a
    # zero-filled copy of the whole tensor (measured on the CPU: fill_, add_ and copy_ then
    # took a tenth of a packed step).
    rows = []
    for lengths, q, k, v in zip(segments, query.unbind(0), key.unbind(0), value.unbind(0),
                                strict=True):
        parts = [_causal(module, qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), dropout,
                         scaling, **kwargs)
                 for qs, ks, vs in zip(q.split(lengths, dim=1), k.split(lengths, dim=1),
                                       v.split(lengths, dim=1), strict=True)]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0)


def varlen_fits(query: torch.Tensor) -> bool:
    """Whether torch's varlen attention (flash attention: CUDA, compute capability 8.0 or
    later, half precision, head size a multiple of 8 up to 256) takes these queries."""
    if varlen_attn is None or not query.is_cuda:
        return False
    size = query.shape[-1]
    return (query.dtype in (torch.float16, torch.bfloat16) and size % 8 == 0 and size <= 256
            and torch.cuda.get_device_capability(query.device) >= (8, 0))


def _varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            segments: Sequence[Sequence[int]], scaling: float | None) -> torch.Tensor:
    """Every segment of every row through one varlen kernel: the rows laid end to end as one
    sequence of B*T tokens, cut at the segments' boundaries. [B, H, T, D] -> [B, T, H, D]."""
    rows, heads, width, size = query.shape
    starts, longest = _cumulative_lengths(tuple(map(tuple, segments)), query.device)

    def tokens(x: torch.Tensor) -> torch.Tensor:  # [B, h, T, D] -> [B*T, h, D]
        return x.transpose(1, 2).reshape(rows * width, x.shape[1], size)

    # window (-1, 0): each token sees every token before it in its segment, none after
    out = varlen_attn(tokens(query), tokens(key), tokens(value), starts, starts, longest,
                      longest, scale=scaling, window_size=(-1, 0),
                      enable_gqa=key.shape[1] != heads)
    return out.view(rows, width, heads, size)


@functools.lru_cache(maxsize=4)
def _cumulative_lengths(segments: tuple[tuple[int, ...], ...],
                        device: torch.device) -> tuple[torch.Tensor, int]:
    """The segments' start offsets in the rows laid end to end (int32, on `device`), and the
    longest segment. Cached: every layer of a step asks for the same ones, and building them
    anew would copy to the GPU once per layer; pinned, the copy does not wait for the GPU."""
    lengths = [n for row in segments for n in row]
    starts = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return starts.pin_memory().to(device, non_blocking=True), max(lengths)


AttentionInterface.register(SEGMENTED, segmented_attention)


def use_segmented_attention(llm: PreTrainedModel) -> str:
    """Set `llm` (a transformers model, or peft's wrapper of one) to attend with SEGMENTED,
    while it trains; returns the implementation it had, to set back (`set_attn_implementation`)
    before anything generates with it: left padding needs a mask."""
    before = llm.config._attn_implementation
    llm.set_attn_implementation(SEGMENTED)
    return before
