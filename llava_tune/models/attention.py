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
attention of flash-attention, written as a loop. transformers builds no mask for an
implementation it has no mask function for, so a model set to it must only see right-padded
or packed rows: `use_segmented_attention` sets a model to it for a run (training/setup.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SEGMENTED = "llava_tune_segmented"


@torch.compiler.disable  # train.compile: one graph per distinct set of segments otherwise
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

    def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)[0]

    if segments is None:
        return causal(query, key, value), None
    if len(segments) != query.shape[0]:
        raise ValueError(f"{len(segments)} rows of segments for a batch of {query.shape[0]}")
    # Rows by unbind and samples by split, not by indexing: their backward passes are one
    # stack and one cat, where each indexed slice's backward would write its gradient into a
    # zero-filled copy of the whole tensor (measured on the CPU: fill_, add_ and copy_ then
    # took a tenth of a packed step).
    rows = []
    for row, (lengths, q, k, v) in enumerate(zip(segments, query.unbind(0), key.unbind(0),
                                                 value.unbind(0), strict=True)):
        if sum(lengths) != q.shape[1]:
            raise ValueError(f"row {row}'s segments cover {sum(lengths)} positions of "
                             f"{q.shape[1]}")
        parts = [causal(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0))
                 for qs, ks, vs in zip(q.split(lengths, dim=1), k.split(lengths, dim=1),
                                       v.split(lengths, dim=1), strict=True)]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


AttentionInterface.register(SEGMENTED, segmented_attention)


def use_segmented_attention(llm: PreTrainedModel) -> str:
    """Set `llm` (a transformers model, or peft's wrapper of one) to attend with SEGMENTED,
    while it trains; returns the implementation it had, to set back (`set_attn_implementation`)
    before anything generates with it: left padding needs a mask."""
    before = llm.config._attn_implementation
    llm.set_attn_implementation(SEGMENTED)
    return before
