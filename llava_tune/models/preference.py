"""Preference-training (DPO / IPO) primitives: each answer's log-probability, and the loss of
a pair of answers against a reference model.

The stage dpo's loss for one pair compares the policy's and the reference's log-probabilities
of the chosen and the rejected answer (a sum over the answer's tokens). Those sums come from
`sequence_logps`, which, like models/loss.py, only sends positions that carry a label through
the LM head, in chunks recomputed in backward, so no [B, T, V] logits tensor is ever built.

The conventions follow TRL's DPOTrainer (tests/test_dpo_parity.py checks the loss and every
gradient against it), with one difference, in `sft_term`: there, every pair weighs the same.
Every function here returns per-pair values [P]; the caller sums them and divides by the pairs
of the optimizer step (over micro-batches and processes), as the other stages do with tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llava_tune.constants import DPO_LOSSES, IGNORE_INDEX
from llava_tune.models.loss import DEFAULT_CHUNK


def _chunk_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of one chunk: hidden [N, D], targets [N] -> [N] float32."""
    # cross_entropy picks the target's log-softmax without keeping a [N, V] log-softmax
    # tensor beside the logits; its negation is the log-probability.
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def sequence_logps(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                   chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its label tokens, and how many there are.

    hidden [R, T, D] (the decoder's last hidden states), labels [R, T] (IGNORE_INDEX where
    there is no label; position t+1's label is predicted from position t, as in
    models/loss.py) -> (logps [R] float32, counts [R] int64). Equal to
    `log_softmax(head(hidden)[:, :-1]).gather(-1, labels[:, 1:])` summed over each row's
    label positions, up to float rounding, gradients too. A row without a label gives 0 (and
    count 0), still part of the graph.

    Only labelled positions go through the head, `chunk` of them at a time; with grad enabled
    and several chunks, each chunk is recomputed in backward, so at most one chunk's fp32
    logits [chunk, V] live at once.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # [R, T-1]
    counts = keep.sum(dim=1)
    rows = keep.nonzero(as_tuple=True)[0]  # [N]: the row of each selected position
    selected = hidden[:, :-1][keep]  # [N, D], in the same row-major order as `rows`
    targets = targets[keep]
    logps = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    if selected.shape[0] == 0:
        # No label in the batch (e.g. answers cut away by max_length): zeros that still depend
        # on the graph, so every process runs the same backward.
        return logps + hidden.sum().float() * 0.0, counts
    # Several chunks: recompute each in backward, so only one chunk's logits live at a time.
    recompute = torch.is_grad_enabled() and selected.shape[0] > chunk
    token_logps = []
    for start in range(0, selected.shape[0], chunk):
        args = (selected[start:start + chunk], head, targets[start:start + chunk])
        token_logps.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if recompute
                           else _chunk_logps(*args))
    # Per-token values [N] are small; one index_add sums them into their rows.
    return logps.index_add(0, rows, torch.cat(token_logps)), counts


def average_logps(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-token mean log-probability: summed logps and their token counts, any shape alike
    (e.g. [P] or [2, P]) -> the same shape, float. A count of 0 divides by 1 (the sum is 0).

    For loss_type "ipo", apply it to all four inputs of `preference_losses`: TRL's
    DPOTrainer (1.16) divides each answer's log-ratio by its completion tokens for IPO (the
    IPO authors' normalization, so that beta means the same for short and long answers),
    while "sigmoid" uses the plain sums.
    """
    return logps / counts.clamp(min=1).to(logps.dtype)


@dataclass
class PreferenceOutput:
    """The loss of each pair, and the rewards that TRL logs (rewards/chosen, /rejected)."""

    losses: torch.Tensor
    """[P] per pair; the caller sums them and divides by the pairs of the step."""
    chosen_rewards: torch.Tensor
    """[P] beta x (policy - reference) log-probability of the chosen answer, detached."""
    rejected_rewards: torch.Tensor
    """[P] the same for the rejected answer, detached."""


def preference_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                      reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, *,
                      beta: float, loss_type: str = "sigmoid",
                      label_smoothing: float = 0.0) -> PreferenceOutput:
    """DPO's or IPO's loss of each pair from the four log-probabilities, each [P] float.

    z = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected), then

    - "sigmoid" (DPO): -(1 - ls) * logsigmoid(beta * z) - ls * logsigmoid(-beta * z), with
      ls = label_smoothing, the share of pairs assumed to be labelled the wrong way round
      (conservative DPO, "cDPO"; 0 gives plain DPO). Pass summed log-probabilities.
    - "ipo": (z - 1 / (2 * beta)) ** 2. Pass per-token means (`average_logps`) to compute
      it as TRL does; the rewards are then per-token too.

    label_smoothing only applies to "sigmoid". (TRL 1.16's "sigmoid" ignores
    label_smoothing; the same formula is its "aot" loss on a single pair.)
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {', '.join(DPO_LOSSES)}")
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    z = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * z)
        if label_smoothing:
            # Written as a blend only when smoothing, so ls = 0 is exactly plain DPO.
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * z)
    else:
        # IPO regresses the margin onto 1 / (2 beta) instead of pushing it to infinity.
        losses = (z - 1 / (2 * beta)) ** 2
    return PreferenceOutput(losses=losses,
                            chosen_rewards=beta * chosen_ratio.detach(),
                            rejected_rewards=beta * rejected_ratio.detach())


def sft_term(policy_chosen_logps: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """The chosen answer's mean token negative log-likelihood, per pair: [P] summed logps,
    [P] their tokens -> [P] (0 for an answer without tokens). RPO's and MPO's SFT term; the
    caller multiplies it by dpo.sft_weight and adds it to `preference_losses(...).losses`.

    How it relates to TRL's `rpo_alpha` (older TRL) or loss_type "sft" (1.16, weighted by
    loss_weights): TRL takes the mean NLL over all chosen tokens of the batch, so a pair weighs
    by its length, and the weighting depends on which pairs share a batch (and process). Here
    each pair's own mean is taken and the caller sums and divides by pairs, so every pair
    weighs the same whatever the batching. The two agree when every chosen answer of the batch
    has the same number of tokens.
    """
    return -average_logps(policy_chosen_logps, chosen_counts)
