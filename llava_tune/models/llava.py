"""The composed model: vision tower -> projector -> image features merged into the LLM input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llava_tune.constants import IMAGE_TOKEN_INDEX
from llava_tune.models.anyres import ImageLayout, Media, pack_features, pool_frames
from llava_tune.models.loss import lm_loss_sum
from llava_tune.models.preference import sequence_logps
from llava_tune.models.projector import Projector
from llava_tune.models.vision import VisionTower


def merge_image_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor | None,
    n_slots: int | None = None,
) -> torch.Tensor:
    """Put image features into the embedding slots marked IMAGE_TOKEN_INDEX.

    embeds [B, T, D], input_ids [B, T], image_features [M, D] (every image token, images in
    order of their slots; or [I, N, D]) -> [B, T, D]. Raises ValueError naming both counts
    when slots and features differ. `n_slots`: the slots, when counted already on the host
    (a training batch): counting them here would make a GPU wait for the host.
    """
    slots = input_ids == IMAGE_TOKEN_INDEX
    if n_slots is None:
        n_slots = int(slots.sum())
    n_features = 0 if image_features is None else image_features[..., 0].numel()
    if n_slots != n_features:
        shape = "no images" if image_features is None else f"{n_features} image tokens"
        raise ValueError(
            f"image slots and image features differ: the input has {n_slots} image-token "
            f"positions but {n_features} image features ({shape})"
        )
    if n_slots == 0:
        return embeds
    features = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    return embeds.masked_scatter(slots.unsqueeze(-1), features)


@dataclass
class LossSum:
    """What a training forward returns: the summed token losses and how many tokens they are."""

    loss_sum: torch.Tensor
    """[] float32: sum of the next-token cross-entropies of the label tokens."""
    num_tokens: torch.Tensor
    """[] int64: label tokens counted."""


@dataclass
class SequenceLogps:
    """What a per-sequence forward returns (preference training)."""

    logps: torch.Tensor
    """[B] float32: each row's summed log-probability of its label tokens."""
    counts: torch.Tensor
    """[B] int64: label tokens per row."""


def unwrap_causal_lm(llm: nn.Module) -> nn.Module:
    """The transformers causal LM under a PEFT wrapper (its LoRA layers are injected in place)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


class LlavaModel(nn.Module):
    """LLaVA: `vision` and `projector` are None for text-only models (stage sft). `layout`
    says how an image becomes tokens (None: one padded square of the tower's patches)."""

    def __init__(self, llm: nn.Module, vision: VisionTower | None = None,
                 projector: Projector | None = None, layout: ImageLayout | None = None) -> None:
        super().__init__()
        self.llm = llm
        self.vision = vision
        self.projector = projector
        self.layout = layout

    def encode_images(self, pixel_values: torch.Tensor,
                      media: list[Media] | None = None) -> torch.Tensor:
        """Tower inputs [T, 3, S, S] (each item's tiles or frames in turn) -> the items'
        tokens [M, D_llm]."""
        return self.image_tokens(self.vision(pixel_values), media)

    def image_tokens(self, features: torch.Tensor,
                     media: list[Media] | None = None) -> torch.Tensor:
        """Tower features [T, N, Dv] of every tile or frame of every item -> the items'
        tokens [M, D_llm] in order (models/anyres.py): N per pad image; anyres packs each
        image's tiles, which needs its size; a video's frames are pooled. `media` describes
        the items (None: pad images only)."""
        projected = self.project(features)
        if media is None or (self.layout is None or not self.layout.anyres) and all(
                m.kind == "image" for m in media):
            return projected.flatten(0, 1)
        counts = [self.layout.inputs(m) for m in media]
        if sum(counts) != projected.shape[0]:
            raise ValueError(f"{len(media)} images or videos take {sum(counts)} tower inputs, "
                             f"but {projected.shape[0]} were given")
        newline = self.projector.image_newline
        tokens = []
        for chunk, item in zip(projected.split(counts), media, strict=True):
            if item.kind == "video":
                tokens.append(pool_frames(chunk, self.layout, newline))
            elif item.kind == "square":
                tokens.append(torch.cat([chunk[0], newline.to(chunk.dtype)[None]]))
            elif self.layout.anyres:
                tokens.append(pack_features(chunk, item.size, self.layout, newline))
            else:
                tokens.append(chunk.flatten(0, 1))
        return torch.cat(tokens)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Tower features [I, N, Dv] (maybe cached, maybe fp16) -> [I, N, D_llm]."""
        weight = next(self.projector.parameters())
        return self.projector(features.to(device=weight.device, dtype=weight.dtype))

    def input_embeddings(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None, media: list[Media] | None = None,
        image_repeats: int = 1, image_slots: int | None = None,
    ) -> torch.Tensor:
        """[B, T] ids (IMAGE_TOKEN_INDEX in image slots) + images as pixels [T, 3, S, S] or as
        the tower's features [T, N, Dv] (T: every item's tiles or frames in turn, one per pad
        image) -> input embeddings [B, T, D]. anyres images and videos need `media`.
        `image_repeats`: the images fill the slots that many times over (a preference batch's
        chosen rows, then its rejected rows: the tower and projector run once).
        `image_slots`: the ids' image slots, if counted on the host already."""
        embed = self.llm.get_input_embeddings()
        embeds = embed(input_ids.clamp(min=0))
        tokens = None
        if pixel_values is not None or image_features is not None:
            if self.projector is None:
                raise ValueError("this model has no vision tower, but images were given")
            features = image_features if image_features is not None else self.vision(pixel_values)
            tokens = self.image_tokens(features, media)
            if image_repeats > 1:
                tokens = tokens.repeat(image_repeats, 1)
        return merge_image_features(embeds, input_ids, tokens, image_slots)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        media: list[Media] | None = None,
        image_repeats: int = 1,
        per_sequence: bool = False,
        image_slots: int | None = None,
        segments: tuple[tuple[int, ...], ...] | None = None,
    ) -> LossSum | SequenceLogps:
        """Training forward: [B, T] ids and labels (+ images) -> summed loss over the label
        tokens (see models/loss.py; the LM head only sees positions that carry a label); or,
        `per_sequence`, each row's summed log-probability of its labels (preference training,
        models/preference.py; `image_repeats` and `image_slots` as in input_embeddings).
        `segments`: a packed batch's sample lengths per row (Batch.segments), for an LLM set
        to segmented attention (models/attention.py; it then ignores `attention_mask`)."""
        embeds = self.input_embeddings(input_ids, pixel_values, image_features, media,
                                       image_repeats, image_slots)
        causal_lm = unwrap_causal_lm(self.llm)
        extra = {} if segments is None else {"segments": segments}
        hidden = causal_lm.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=False, **extra,
        ).last_hidden_state
        if per_sequence:
            logps, counts = sequence_logps(hidden, causal_lm.get_output_embeddings(), labels)
            return SequenceLogps(self._projector_joins(logps, pixel_values, image_features),
                                 counts)
        loss_sum, count = lm_loss_sum(hidden, causal_lm.get_output_embeddings(), labels)
        return LossSum(self._projector_joins(loss_sum, pixel_values, image_features), count)

    def _projector_joins(self, value: torch.Tensor, pixel_values: torch.Tensor | None,
                         image_features: torch.Tensor | None) -> torch.Tensor:
        if pixel_values is None and image_features is None and self.projector is not None:
            # A micro-batch of text alone: the projector joins the graph at zero weight, so a
            # stage where only it trains (pretrain) still has a loss to backpropagate (its
            # gradient is zero), and every process's backward reaches the same parameters.
            trained = [p.sum() for p in self.projector.parameters() if p.requires_grad]
            if trained:
                value = value + 0.0 * torch.stack(trained).sum()
        return value

    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
               media: list[Media] | None = None, **kwargs) -> torch.Tensor:
        """[B, T] ids (+ images) -> logits [B, T, V] (inference and parity checks)."""
        embeds = self.input_embeddings(input_ids, pixel_values, media=media)
        return self.llm(inputs_embeds=embeds, use_cache=False, **kwargs).logits
