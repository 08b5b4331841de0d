"""The CLIP ViT of the vision tower, built by llava-tune: open_clip's `VisionTransformer` as
llava-tune uses it, without importing open_clip (whose import costs every process 51 MB of
memory: timm and the text tokenizer's tables, neither of which a ViT needs).

Same network, same parameter names as open_clip's visual module, except that attention keeps
q, k and v as three nn.Linear (`q_proj`, `k_proj`, `v_proj`, with `out_proj`) where open_clip
packs them into one `in_proj` of nn.MultiheadAttention: a LoRA on the tower then has one
adapter per projection, module for module like transformers' CLIPVisionModel, which XTuner's
published `visual_encoder_adapter/` targets. Reading open_clip's configs and weight files
(fused in_proj split at load time) is convert/open_clip_format.py's job, Hugging Face CLIP
folders convert/open_clip.py's.

    pixels [B, 3, S, S] -conv1 (patch P, no bias)-> [B, N, W] (N = (S // P) ** 2)
      -> [CLS; patches] + positional_embedding -> ln_pre -> [B, 1 + N, W]
      -> resblocks: x + attn(ln_1(x)); x + mlp(ln_2(x))   (mlp: c_fc, GELU or QuickGELU, c_proj)
      -> block `layer`'s tokens, CLS dropped [B, N, W]      (forward: what feeds the projector)
      -> ... last block -> ln_post(CLS) @ proj [B, D]      (pooled: CLIP's image embedding)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# OpenAI's normalization; open_clip's default for every model name (pretrained tags aside).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ViTConfig:
    """A CLIP ViT's shape and preprocessing. Square images and patches only."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    output_dim: int | None
    """Columns of `proj` [width, output_dim]; None: no projection (a CLIPVisionModel's)."""
    quick_gelu: bool = False
    """QuickGELU (x * sigmoid(1.702 x), as OpenAI trained CLIP) instead of the exact GELU."""
    eps: float = 1e-5
    """LayerNorm epsilon, every norm of the tower."""
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def __post_init__(self) -> None:
        # Our invariants: the readers of configs check users' values with messages of their own.
        assert self.width % self.heads == 0, (self.width, self.heads)
        assert self.image_size >= self.patch_size > 0 and self.layers > 0, self

    @property
    def grid_size(self) -> int:
        """Patches per side (open_clip and transformers both floor: a remainder is cut off)."""
        return self.image_size // self.patch_size


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose output has its input's dtype, as open_clip's (under autocast a bf16
    input comes back bf16, not float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with q, k, v and the output as four nn.Linear:
    [B, T, W] -> [B, T, W]. Computes what nn.MultiheadAttention computes from the same
    weights stacked into its in_proj (q rows, then k, then v)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, H, T, W/H]
            return y.view(batch, length, self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                             heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's init, in its order of random draws: out_proj as an
        nn.Linear, then one Xavier-uniform [3W, W] in_proj (shared out to q, k, v); biases 0."""
        self.out_proj.reset_parameters()
        width = self.q_proj.in_features
        fused = nn.init.xavier_uniform_(torch.empty(3 * width, width))
        for i, linear in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            linear.weight.copy_(fused[i * width:(i + 1) * width])
            linear.bias.zero_()
        self.out_proj.bias.zero_()


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)). [B, T, W] -> same."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        width = config.width
        self.ln_1 = LayerNorm(width, eps=config.eps)
        self.attn = Attention(width, config.heads)
        self.ln_2 = LayerNorm(width, eps=config.eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, config.mlp_width)),
            ("gelu", QuickGELU() if config.quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(config.mlp_width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def reset_parameters(self) -> None:
        """open_clip's init of its ResidualAttentionBlock, in its order of random draws."""
        self.ln_1.reset_parameters()
        self.attn.reset_parameters()
        self.ln_2.reset_parameters()
        self.mlp.c_fc.reset_parameters()
        self.mlp.c_proj.reset_parameters()


class Transformer(nn.Module):
    """The stack of blocks (`resblocks`, open_clip's name), with gradient checkpointing."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.width = config.width
        self.resblocks = nn.ModuleList(ResidualBlock(config) for _ in range(config.layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, last: int) -> torch.Tensor:
        """Blocks 0..last (inclusive) on x [B, T, W] -> [B, T, W]; the later ones never run."""
        for block in self.resblocks[:last + 1]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Activations of a block are recomputed in backward instead of kept.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class ClipViT(nn.Module):
    """CLIP's vision transformer: pixels [B, 3, S, S] -> patch features [B, N, W] of one block
    (`forward`), or the pooled, projected image embedding [B, D] (`pooled`).

    Built with random weights (`reset_parameters`: open_clip's init, draw for draw, so a seed
    gives the weights open_clip's create_model gives its visual part) or on the meta device
    and then loaded (convert/open_clip_format.py, convert/open_clip.py).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        # Not `config`: PEFT (and others) read a module's `config` as a transformers config.
        self.vit_config = config
        width = config.width
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.grid_size = config.grid_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size,
                               stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(self.grid_size ** 2 + 1, width))
        self.ln_pre = LayerNorm(width, eps=config.eps)
        self.transformer = Transformer(config)
        self.ln_post = LayerNorm(width, eps=config.eps)
        self.proj = (nn.Parameter(torch.empty(width, config.output_dim))
                     if config.output_dim is not None else None)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.vit_config.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.vit_config.std

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random weights as open_clip initializes its VisionTransformer, in the same order of
        draws from torch's default generator (the embeddings and `proj` are N(0, 1/width)): on
        the CPU, the same seed gives the same weights."""
        scale = self.vit_config.width ** -0.5
        self.conv1.reset_parameters()
        for param in (self.class_embedding, self.positional_embedding):
            param.copy_(scale * torch.randn(param.shape))
        self.ln_pre.reset_parameters()
        for block in self.transformer.resblocks:
            block.reset_parameters()
        self.ln_post.reset_parameters()
        if self.proj is not None:
            self.proj.copy_(scale * torch.randn(self.proj.shape))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> the first block's input [B, 1 + N, W] (CLS first)."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [B, W, g, g] -> [B, N, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def block_index(self, layer: int) -> int:
        """Block `layer` counted from 0, negative from the end (-1 the last), as an index."""
        layers = self.vit_config.layers
        if not -layers <= layer < layers:
            raise IndexError(f"block {layer} of a {layers}-block ViT")
        return layer % layers

    def forward(self, pixels: torch.Tensor, layer: int) -> torch.Tensor:
        """pixels [B, 3, S, S] -> block `layer`'s output without the CLS token [B, N, W]
        (open_clip's forward_intermediates(indices=[layer], output_fmt="NLC"))."""
        x = self.transformer(self.embed(pixels), self.block_index(layer))
        return x[:, 1:]

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> CLIP's image embedding: ln_post of the last block's CLS
        token [B, W], times `proj` when the tower has one -> [B, D]."""
        x = self.transformer(self.embed(pixels), self.vit_config.layers - 1)
        pooled = self.ln_post(x[:, 0])
        return pooled @ self.proj if self.proj is not None else pooled


def build_vit(config: ViTConfig, device: torch.device | str | None = None) -> ClipViT:
    """A ClipViT with random weights (open_clip's init; on the CPU, draw for draw) on `device`
    (None: torch's default device); on the meta device, shapes only (memory estimates, tests,
    and the loaders, which make the loaded tensors its parameters)."""
    device = torch.device(device) if device is not None else torch.get_default_device()
    with torch.device("meta"):
        vit = ClipViT(config)  # no memory and no random draws spent on weights yet
    if device.type == "meta":
        return vit
    vit.to_empty(device=device)
    vit.reset_parameters()
    return vit
