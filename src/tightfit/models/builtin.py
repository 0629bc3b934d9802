"""Models that ship with tightfit, built with plain torch: ``builtin:NAME``.

They exist so that every part of tightfit (recipes, the planner, the tests, the benchmarks) has
small, dependency-free models of each family to work on:

=============  ==============================================================================
name           what it is
=============  ==============================================================================
digits-cnn     3-conv CNN for 1x8x8 images (sklearn digits), ~0.1 M parameters, 10 classes
mlp            flatten + hidden layers + classifier; ``in_features`` defaults to 64 (digits)
small-cnn      4-stage conv net for any image size (global average pooling)
tiny-gpt       decoder-only causal LM; ``forward(input_ids, labels=...)`` returns ``.loss``
tiny-bert      bidirectional encoder + [CLS] classifier; ``forward(input_ids, labels=...)``
unet-small     3-level UNet, output has the input's shape (denoising / segmentation)
vit            ViT over 2D patches (``image_size``, ``patch_size``, ``dim``, ``depth`` ...)
vit3d          ViT over 3D patches of volumes (C x D x H x W), ViT-B/16 sized by default
=============  ==============================================================================

Transformer models keep their blocks in an ``nn.ModuleList`` named ``blocks`` so that
:func:`tightfit.models.checkpointing.find_repeated_blocks` finds them, and expose a ``config``
namespace with ``vocab_size`` where they take token ids, which is where
:func:`tightfit.models.spec.make_batch_factory` reads the vocabulary from.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelOutput:
    """What the builtin language/encoder models return: ``logits`` and, given labels, ``loss``.

    ``tightfit.step.loss.task_loss`` uses ``loss`` when it is set, as for HF models.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None = None


# ---------------------------------------------------------------------------------- vision CNNs


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 grey images: 98-99 % test accuracy on sklearn digits in seconds.

    Args:
        num_classes: number of output classes.
        in_channels: input channels (1 for digits).
        width: channels of the first convolution; later ones are 2x and 4x.
        dropout: dropout before the classifier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),  # 8x8 -> 4x4: enough spatial detail left for the last conv
            _conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class MLP(nn.Module):
    """Flatten, then ``len(hidden_sizes)`` Linear+ReLU layers, then a linear classifier.

    Args:
        num_classes: outputs of the last layer.
        in_features: size of one flattened input (64 for 8x8 digits).
        hidden_sizes: widths of the hidden layers.
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 64,
        hidden_sizes: tuple[int, ...] | list[int] = (256, 128),
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


class SmallCNN(nn.Module):
    """Four conv stages (each conv-BN-ReLU twice, then 2x downsampling) and global pooling.

    Works on any image size of at least 16x16.

    Args:
        num_classes: number of output classes.
        in_channels: input channels.
        width: channels of the first stage; each stage doubles it.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()
        stages = []
        channels = in_channels
        for stage in range(4):
            out_channels = width * 2**stage
            stages.append(
                nn.Sequential(
                    _conv_bn_relu(channels, out_channels),
                    _conv_bn_relu(out_channels, out_channels),
                    nn.MaxPool2d(2),
                )
            )
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(images))


class UNetSmall(nn.Module):
    """A 3-level UNet (conv-GroupNorm-SiLU blocks, skip connections); output shape = input shape.

    Height and width must be divisible by ``2 ** (levels - 1)``.

    Args:
        in_channels: input channels.
        out_channels: output channels (default: ``in_channels``, as for denoising).
        width: channels of the first level; each level doubles it.
        levels: number of resolutions.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, width: int = 32, levels: int = 3):
        super().__init__()
        widths = [width * 2**level for level in range(levels)]
        self.down = nn.ModuleList()
        channels = in_channels
        for level_width in widths:
            self.down.append(self._block(channels, level_width))
            channels = level_width
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level_width in reversed(widths[:-1]):
            self.upsample.append(nn.ConvTranspose2d(channels, level_width, kernel_size=2, stride=2))
            self.up.append(self._block(2 * level_width, level_width))
            channels = level_width
        self.out = nn.Conv2d(channels, out_channels or in_channels, kernel_size=1)

    @staticmethod
    def _block(in_channels: int, out_channels: int) -> nn.Sequential:
        groups = math.gcd(8, out_channels)
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = []
        hidden = images
        for level, block in enumerate(self.down):
            hidden = block(hidden)
            if level < len(self.down) - 1:
                skips.append(hidden)
                hidden = F.max_pool2d(hidden, 2)
        for upsample, block in zip(self.upsample, self.up):
            hidden = upsample(hidden)
            hidden = block(torch.cat([hidden, skips.pop()], dim=1))
        return self.out(hidden)


# ---------------------------------------------------------------------------------- transformers


def _init_transformer_weights(module: nn.Module) -> None:
    """GPT-2/BERT initialisation: N(0, 0.02) weights, zero biases, so the first loss is ~ln(vocab)."""
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d, nn.Conv3d)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class TransformerBlock(nn.Module):
    """A pre-norm transformer block: LayerNorm, multi-head attention, LayerNorm, GELU MLP.

    Args:
        dim: model width.
        heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        dropout: dropout on the attention weights and the residual branches.
        causal: mask future positions (decoder) or not (encoder).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = hidden.shape
        query, key, value = (
            self.qkv(self.norm1(hidden)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        )
        # padding_mask: (batch, length) with True/1 on real tokens; SDPA wants True where allowed.
        attention_mask = None
        if padding_mask is not None:
            attention_mask = padding_mask.bool()[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and attention_mask is None,
        )
        attended = attended.transpose(1, 2).reshape(batch, length, dim)
        hidden = hidden + self.residual_dropout(self.proj(attended))
        return hidden + self.residual_dropout(self.mlp(self.norm2(hidden)))


class _TokenTransformer(nn.Module):
    """Token and position embeddings, ``depth`` transformer blocks and a final norm.

    The shared trunk of :class:`TinyGPT` and :class:`TinyBERT`; they add their heads.
    """

    def __init__(
        self, vocab_size: int, max_length: int, dim: int, depth: int, heads: int, dropout: float, causal: bool
    ):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_length, dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, dropout=dropout, causal=causal) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_length {self.position_embedding.num_embeddings}")
        positions = torch.arange(length, device=input_ids.device)
        return self.embedding_dropout(self.token_embedding(input_ids) + self.position_embedding(positions))


class TinyGPT(_TokenTransformer):
    """A decoder-only causal language model (GPT-2 style, tied embeddings).

    ``forward(input_ids, attention_mask=None, labels=None)`` returns :class:`ModelOutput`; with
    ``labels`` (usually the input ids themselves) the loss is next-token cross-entropy, positions
    labelled -100 ignored, as in HF causal LMs.

    Args:
        vocab_size: number of token ids.
        max_length: longest sequence (learned position embeddings).
        dim, depth, heads: width, number of blocks, attention heads.
        dropout: dropout in the blocks and on the embeddings.
    """

    def __init__(
        self,
        vocab_size: int = 1024,
        max_length: int = 256,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__(vocab_size, max_length, dim, depth, heads, dropout, causal=True)
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_length, is_causal_lm=True)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied, as in GPT-2
        self.apply(_init_transformer_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        hidden = self.embed(input_ids)
        for block in self.blocks:
            # Causal masking already hides the future; padding only matters for the loss (labels -100).
            hidden = block(hidden)
        logits = self.lm_head(self.norm(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return ModelOutput(logits=logits, loss=loss)


class TinyBERT(_TokenTransformer):
    """A bidirectional transformer encoder with a classifier on the first ([CLS]) position.

    ``forward(input_ids, attention_mask=None, labels=None)`` returns :class:`ModelOutput` with
    ``logits`` of shape (batch, num_classes) and, given class-index ``labels``, cross-entropy.

    Args:
        num_classes: classifier outputs.
        vocab_size, max_length, dim, depth, heads, dropout: as for :class:`TinyGPT`.
    """

    def __init__(
        self,
        num_classes: int = 2,
        vocab_size: int = 1024,
        max_length: int = 256,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__(vocab_size, max_length, dim, depth, heads, dropout, causal=False)
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_length, num_labels=num_classes)
        self.classifier = nn.Linear(dim, num_classes)
        self.apply(_init_transformer_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden, attention_mask)
        logits = self.classifier(self.norm(hidden[:, 0]))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss)


class ViT(nn.Module):
    """A Vision Transformer over 2D or 3D patches (ViT-B/16 sized by default).

    The patch embedding is a strided convolution (``Conv2d`` for images C x H x W, ``Conv3d`` for
    volumes C x D x H x W), a learned [CLS] token and position embeddings, ``depth`` pre-norm
    blocks, and a linear classifier on the [CLS] position.

    Args:
        num_classes: classifier outputs.
        image_size: side of the (square/cubic) input.
        patch_size: side of one patch; ``image_size`` must be divisible by it.
        in_channels: input channels.
        dim, depth, heads, mlp_ratio, dropout: transformer size.
        spatial_dims: 2 for images, 3 for volumes.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        convolution = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self.image_size = image_size
        self.patch_embedding = convolution(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        num_patches = (image_size // patch_size) ** spatial_dims
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_transformer_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[2:]) != (self.image_size,) * (images.ndim - 2):
            raise ValueError(f"expected inputs of side {self.image_size}, got shape {tuple(images.shape)}")
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)
        hidden = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1)
        hidden = hidden + self.position_embedding
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden[:, 0]))


def _vit3d(num_classes: int = 2, image_size: int = 96, patch_size: int = 16, in_channels: int = 1, **kwargs) -> ViT:
    """ViT-B/16 over 96^3 single-channel volumes (the MIM-Med3D backbone size) unless told otherwise."""
    return ViT(
        num_classes=num_classes,
        image_size=image_size,
        patch_size=patch_size,
        in_channels=in_channels,
        spatial_dims=3,
        **kwargs,
    )


BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "mlp": MLP,
    "small-cnn": SmallCNN,
    "tiny-gpt": TinyGPT,
    "tiny-bert": TinyBERT,
    "unet-small": UNetSmall,
    "vit": ViT,
    "vit3d": _vit3d,
}
"""name -> constructor; each takes keyword arguments only (``num_classes`` where it has classes)."""

# Builtins without a class count: ``num_classes`` is not passed to them.
WITHOUT_CLASSES = frozenset({"tiny-gpt", "unet-small"})

# What a builtin can take from the data instead of its defaults: option -> value from the shape of
# one input sample. Applied by ``models.spec.build_model_for_data`` unless the recipe sets the option.
FROM_INPUT_SHAPE: dict[str, dict[str, Callable[[tuple[int, ...]], int]]] = {
    "mlp": {"in_features": math.prod},
    "digits-cnn": {"in_channels": lambda shape: shape[0]},
    "small-cnn": {"in_channels": lambda shape: shape[0]},
    "unet-small": {"in_channels": lambda shape: shape[0]},
}
