"""Preference training (stage dpo) on the one loop: what a step's loss is for a batch of
pairs, and the reference model it is measured against.

The reference is the model the run starts from (its init_from run), never a second copy in
memory:

- `precompute` (default): before the first step, one pass over every pair with the starting
  weights gives the reference's log-probabilities of each chosen and rejected answer; they are
  kept in a file keyed by everything that decides them (the prepared data files, the base LLM,
  the init_from run's weights, the model settings), so a resumed run or a rerun reads them
  back, and a file made for another model, tokenizer or data is never used.
- `live`: at every step, the trained parameters (LoRA, projector: small) are set back to
  their starting values for a no-grad forward, then restored. Full-weight runs precompute.

Each pair weighs the same: the step's loss is the sum of its pairs' losses over the pairs of
the accumulation window and every process (Batch.loss_units), as tokens weigh in the other
stages.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Subset

from llava_tune.config import Config, DpoConfig
from llava_tune.data.collate import Batch, Collator
from llava_tune.files import write_bytes_atomic
from llava_tune.models.preference import average_logps, preference_losses, sft_term

REFERENCE_VERSION = 1
"""Bumped when what a reference file holds changes; part of its key."""

STATS = ("pairs", "chosen_reward", "rejected_reward", "correct")
"""What a preference step adds up besides its loss (summed over pairs): the metrics'
rewards/chosen, rewards/rejected, rewards/margin and rewards/accuracy are their means."""


def lm_objective(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
    """The other stages' loss: summed token cross-entropy (models/loss.py), no stats."""
    return model(**batch.model_inputs()).loss_sum, {}


@dataclass
class DpoObjective:
    """A preference batch's summed pair losses (+ the SFT term) and reward sums."""

    config: DpoConfig
    params: list[torch.nn.Parameter]
    """The trained parameters (for a live reference)."""
    start: list[torch.Tensor] | None = None
    """Their values when the run started (live reference only)."""

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        # A live reference first: setting the weights back in place after the policy's
        # forward would change tensors its backward needs.
        reference = (batch.reference.t() if batch.reference is not None
                     else self.live_reference(model, batch))
        out = model(**batch.model_inputs(), image_repeats=2, per_sequence=True)
        policy, counts = out.logps.view(2, -1), out.counts.view(2, -1)
        return pair_losses(self.config, policy, counts, reference.to(policy.device))

    def live_reference(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """[2, pairs]: the starting weights' log-probabilities of the batch's answers."""
        if self.start is None:
            raise RuntimeError("no reference: neither precomputed nor live")
        with starting_weights(self.params, self.start), _eval(model), torch.no_grad():
            return model(**batch.model_inputs(), image_repeats=2,
                         per_sequence=True).logps.view(2, -1).float()


def pair_losses(config: DpoConfig, policy: torch.Tensor, counts: torch.Tensor,
                reference: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """policy, reference [2, P] summed log-probabilities of the chosen (row 0) and rejected
    (row 1) answers, counts [2, P] their tokens -> (summed loss over the pairs that carry
    one, {STATS: summed over them}). IPO compares per-token means, as TRL does."""
    reference = reference.to(policy.dtype)
    sums, reference_sums = policy, reference
    if config.loss == "ipo":
        policy, reference = average_logps(policy, counts), average_logps(reference, counts)
    out = preference_losses(policy[0], policy[1], reference[0], reference[1], beta=config.beta,
                            loss_type=config.loss, label_smoothing=config.label_smoothing)
    valid = (counts > 0).all(0).to(policy.dtype)  # stand-ins for failed samples carry none
    losses = out.losses
    if config.loss == "ipo":  # rewards from the sums, as for sigmoid (and as TRL logs them)
        ratios = (sums - reference_sums).detach() * config.beta
        out.chosen_rewards, out.rejected_rewards = ratios[0], ratios[1]
    if config.sft_weight:
        losses = losses + config.sft_weight * sft_term(sums[0], counts[0])
    stats = {"pairs": valid.sum().detach(),
             "chosen_reward": (out.chosen_rewards * valid).sum(),
             "rejected_reward": (out.rejected_rewards * valid).sum(),
             "correct": ((out.chosen_rewards > out.rejected_rewards).to(valid.dtype) * valid).sum()}
    return (losses * valid).sum(), stats


def reward_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The STATS sums of a window (or a run) -> rewards/chosen, /rejected, /margin, /accuracy
    (means over its pairs)."""
    pairs = max(sums.get("pairs", 0.0), 1.0)
    chosen, rejected = sums["chosen_reward"] / pairs, sums["rejected_reward"] / pairs
    return {"rewards/chosen": round(chosen, 5), "rewards/rejected": round(rejected, 5),
            "rewards/margin": round(chosen - rejected, 5),
            "rewards/accuracy": round(sums["correct"] / pairs, 5)}


@contextmanager
def starting_weights(params: list[torch.nn.Parameter],
                     start: list[torch.Tensor]) -> Iterator[None]:
    """The parameters hold their starting values inside, their current ones again after."""
    with torch.no_grad():
        current = [p.detach().clone() for p in params]
        for p, value in zip(params, start, strict=True):
            p.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, current, strict=True):
                p.copy_(value)


@contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    """No dropout while the reference scores (it is a fixed model). bitsandbytes' 4-bit
    layers stay in training mode: on a CPU, the first forward of one in eval mode without
    grad repacks its weights for another kernel, which rounds differently for the rest of
    the run; a run that reads the reference back would then train apart from the one that
    computed it."""
    was = model.training
    model.eval()
    bnb = sys.modules.get("bitsandbytes")  # loaded by a 4-bit LLM; absent otherwise
    four_bit = [m for m in model.modules() if bnb is not None and isinstance(m, bnb.nn.Linear4bit)]
    for module in four_bit:
        module.training = True
    try:
        yield
    finally:
        model.train(was)


# --------------------------------------------------------------------------- precompute


def reference_key(config: Config, dataset) -> str:
    """What decides a dataset's reference values: its prepared files (data file, tokenizer,
    template, max_length, image layout), the model it starts from (base LLM and init_from
    weights, by name, size and time) and the model's settings."""
    parts = (dataset.part_keys, _files_of(config.model.llm),
             _files_of(config.init_from) if config.init_from else None,
             _files_of(config.model.vision.pretrained), _files_of(config.model.vision.config_file),
             repr(config.model), config.train.mixed_precision, REFERENCE_VERSION)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _files_of(path: str | None) -> list[tuple[str, int, int]] | None:
    if not path or not os.path.exists(path):
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                 and "checkpoints" not in p.parts)
    return [(str(p.relative_to(root)) if p != root else p.name, p.stat().st_size,
             p.stat().st_mtime_ns) for p in files]


def precompute_reference(config: Config, dataset, model: torch.nn.Module, folder: Path,
                         accelerator: Accelerator, pad_token_id: int) -> bool:
    """Set `dataset.reference` ([rows, 2]) from `folder`'s file for its key, or compute it now
    with `model` as it is (the starting weights), each process a share of the rows, and save
    it (main process). Returns whether it was computed."""
    file = Path(folder) / f"reference-{reference_key(config, dataset)}.npy"
    if file.is_file():
        dataset.reference = np.load(file)
        return False
    rows = np.unique(dataset.indices)  # each table row once, whatever the mixture repeats
    mine = Subset(_RowView(dataset), rows[accelerator.process_index::accelerator.num_processes]
                  .tolist())
    loader = DataLoader(mine, batch_size=config.train.batch_size,
                        collate_fn=Collator(pad_token_id, preference=True))
    found: list[tuple[int, float, float]] = []
    # The pass must not draw from the run's random streams (a loader's iterator draws its
    # seed): a run that reads the values back must train exactly as the one that made them.
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), _eval(model), torch.no_grad():
        for batch in loader:
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                logps = model(**batch.model_inputs(), image_repeats=2,
                              per_sequence=True).logps.view(2, -1).float().cpu()
            found += [(row, float(c), float(r)) for row, c, r in
                      zip(batch.rows, logps[0].tolist(), logps[1].tolist(), strict=True)
                      if row >= 0]
    if accelerator.num_processes > 1:
        found = gather_object(found)
    reference = np.zeros((len(dataset.table), 2), dtype=np.float32)
    for row, chosen, rejected in found:
        reference[row] = (chosen, rejected)
    if accelerator.is_main_process:
        buffer = io.BytesIO()
        np.save(buffer, reference)
        file.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(file, buffer.getvalue())
    dataset.reference = reference
    return True


class _RowView(torch.utils.data.Dataset):
    """A ConversationDataset read by table row (not by sample index): each row once."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.order = {int(row): index for index, row in
                      reversed(list(enumerate(dataset.indices.tolist())))}

    def __len__(self) -> int:
        return len(self.dataset.table)

    def __getitem__(self, row: int) -> dict:
        return self.dataset[self.order[row]]
