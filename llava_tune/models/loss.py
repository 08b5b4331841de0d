"""The language-model loss without the full logits tensor.

A causal LM's plain loss materializes logits [B, T, V] in fp32: with InternLM2's 92,544-token
vocabulary that is 1.5 GB for 2 x 2048 tokens, plus as much again for its gradient, more than
the rest of a QLoRA step at 1.8B. Two things shrink it here, without changing the loss:

- only positions that carry a label go through the LM head (prompts and image slots never
  need logits; in LLaVA data most positions are either);
- those positions go through the head and cross-entropy in chunks, each recomputed in the
  backward pass (activation checkpointing), so at most one chunk's logits live at a time.

The result is the sum of the token losses (not the mean), so that the trainer can weigh every
token of an optimizer step alike across micro-batches and processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llava_tune.constants import IGNORE_INDEX

DEFAULT_CHUNK = 1024
"""Label tokens per chunk: 1024 x 92,544 fp32 logits are 380 MB (their gradient as much)."""


def _chunk_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: hidden [N, D], targets [N] -> scalar."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _fused_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor | None:
    """Liger's fused linear cross-entropy (CUDA only, `pip install -e .[fast]`), for a plain
    Linear head; None when it does not apply (the chunked path is then used)."""
    if not hidden.is_cuda or type(head) is not nn.Linear:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    loss = liger_fused_linear_cross_entropy(hidden, head.weight, targets, bias=head.bias,
                                            reduction="sum")
    # Some Liger versions return (loss, z_loss).
    return (loss[0] if isinstance(loss, tuple) else loss).float()


def lm_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the label tokens, and their count.

    hidden [B, T, D] (the decoder's last hidden states), labels [B, T] (IGNORE_INDEX where
    there is no loss; position t+1's label is predicted from position t) -> (loss sum [],
    label tokens [] int64). Equal to `F.cross_entropy(head(hidden)[:, :-1], labels[:, 1:],
    reduction="sum")` up to float rounding, gradients too.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    count = keep.sum()
    selected = hidden[:, :-1][keep]  # [N, D]
    targets = targets[keep]
    if selected.shape[0] == 0:
        # No label here (e.g. a micro-batch of prompts cut by max_length): a zero that still
        # depends on the graph, so every process runs the same backward.
        return hidden.sum() * 0.0, count
    fused = _fused_loss(selected, head, targets)
    if fused is not None:
        return fused, count
    # Several chunks: recompute each in backward, so only one chunk's logits live at a time.
    recompute = torch.is_grad_enabled() and selected.shape[0] > chunk
    total = selected.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk):
        args = (selected[start:start + chunk], head, targets[start:start + chunk])
        total = total + (checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute
                         else _chunk_loss(*args))
    return total, count
