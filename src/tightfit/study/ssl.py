"""Self-supervised objectives as modules whose ``forward(images)`` returns the loss.

Wrapped around a backbone, they train through the ordinary :class:`~tightfit.training.Trainer`
unchanged: a batch of bare images has no target, and ``tightfit.step.loss`` takes the model's own
``output.loss`` first. Checkpoints, resume, precision and memory planning therefore work as for
any run; the backbone's weights sit under the ``encoder.`` prefix of the checkpoint.

* :class:`MaskedImageModeling`: MAE (He et al., 2022) for tightfit's 2D and 3D ViTs: a random
  ``mask_ratio`` of the patches is hidden, the encoder sees only the visible ones, a light decoder
  (``decoder_depth`` blocks of width ``decoder_dim``) predicts the pixels of the hidden patches,
  and the loss is the mean squared error on those patches, each normalised by its own mean and
  variance (MAE's ``norm_pix_loss``).
* :class:`ContrastiveLearning`: SimCLR (Chen et al., 2020): two random views of every image
  (affine jitter, intensity scale, noise), a projection head, and the NT-Xent loss at
  ``temperature``. Each sample's negatives are the other ``2 * (batch - 1)`` views of the batch,
  so the batch size is part of the objective: a larger batch is a harder, better-posed task
  (SimCLR used 4096); gradient accumulation does not add negatives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tightfit.errors import ConfigError
from tightfit.models.builtin import ModelOutput, TransformerBlock, ViT
from tightfit.study.backbone import FeatureExtractor

ENCODER_PREFIX = "encoder."


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, patches, C * patch_size ** dims)`` in the order of a strided conv's
    ``flatten(2)``.
    """
    batch, channels, *spatial = images.shape
    grid = [side // patch_size for side in spatial]
    shape = [batch, channels]
    for cells in grid:
        shape += [cells, patch_size]
    patches = images.reshape(shape)
    dims = len(spatial)
    grid_axes = [2 + 2 * axis for axis in range(dims)]
    patch_axes = [3 + 2 * axis for axis in range(dims)]
    patches = patches.permute(0, *grid_axes, 1, *patch_axes)
    return patches.reshape(batch, math.prod(grid), channels * patch_size**dims)


class MaskedImageModeling(nn.Module):
    """MAE-style masked image modelling around a builtin ViT (2D or 3D); see the module doc.

    Args:
        encoder: a ``builtin:vit`` or ``builtin:vit3d`` model.
        mask_ratio: share of patches hidden from the encoder.
        decoder_dim: width of the decoder.
        decoder_depth: transformer blocks in the decoder.
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 64, decoder_depth: int = 1):
        super().__init__()
        if not isinstance(encoder, ViT):
            raise ConfigError(
                f"objective: mim needs a builtin:vit or builtin:vit3d backbone, got {type(encoder).__name__}"
            )
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        convolution = encoder.patch_embedding
        self.patch_size = convolution.kernel_size[0]
        dims = convolution.weight.ndim - 2
        num_tokens, dim = encoder.position_embedding.shape[1:]
        heads = next(count for count in (4, 2, 1) if decoder_dim % count == 0)
        self.decoder_embedding = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_position = nn.Parameter(torch.randn(1, num_tokens, decoder_dim) * 0.02)
        self.decoder_blocks = nn.ModuleList(TransformerBlock(decoder_dim, heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.prediction = nn.Linear(decoder_dim, convolution.in_channels * self.patch_size**dims)

    def forward(self, images: torch.Tensor) -> ModelOutput:
        encoder = self.encoder
        target = patchify(images, self.patch_size)
        tokens = encoder.patch_embedding(images).flatten(2).transpose(1, 2) + encoder.position_embedding[:, 1:]
        batch, num_patches, dim = tokens.shape
        keep = max(1, round(num_patches * (1 - self.mask_ratio)))
        order = torch.rand(batch, num_patches, device=images.device).argsort(dim=1)
        restore = order.argsort(dim=1)
        visible = tokens.gather(1, order[:, :keep, None].expand(-1, -1, dim))
        cls = (encoder.cls_token + encoder.position_embedding[:, :1]).expand(batch, -1, -1)
        hidden = torch.cat([cls, visible], dim=1)
        for block in encoder.blocks:
            hidden = block(hidden)
        hidden = self.decoder_embedding(encoder.norm(hidden))
        hidden_patches = torch.cat([hidden[:, 1:], self.mask_token.expand(batch, num_patches - keep, -1)], dim=1)
        hidden_patches = hidden_patches.gather(1, restore[..., None].expand(-1, -1, hidden.shape[-1]))
        hidden = torch.cat([hidden[:, :1], hidden_patches], dim=1) + self.decoder_position
        for block in self.decoder_blocks:
            hidden = block(hidden)
        prediction = self.prediction(self.decoder_norm(hidden)[:, 1:])
        mask = torch.ones(batch, num_patches, device=images.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)  # 1 on hidden patches, in patch order
        mean = target.mean(dim=-1, keepdim=True)
        variance = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (variance + 1e-6).sqrt()
        per_patch = (prediction.float() - target.float()).pow(2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return ModelOutput(logits=prediction, loss=loss)


def nt_xent(projections: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss for ``2N`` projections where rows ``i`` and ``i + N`` are two views of one sample."""
    views = F.normalize(projections.float(), dim=1)
    similarity = views @ views.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    count = len(views) // 2
    positives = torch.cat([torch.arange(count, 2 * count), torch.arange(0, count)]).to(views.device)
    return F.cross_entropy(similarity, positives)


def random_view(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view of 2D or 3D images: affine jitter (scale 0.8-1, shift +-10 %), intensity scale 0.8-1.2, noise."""
    batch, dims = images.shape[0], images.ndim - 2
    device = images.device
    scale = torch.empty(batch, device=device).uniform_(0.8, 1.0)
    theta = torch.zeros(batch, dims, dims + 1, device=device)
    for axis in range(dims):
        theta[:, axis, axis] = scale
    theta[:, :, dims] = torch.empty(batch, dims, device=device).uniform_(-0.1, 0.1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    view = F.grid_sample(images.float(), grid.to(images.dtype).float(), align_corners=False, padding_mode="zeros")
    shape = (batch,) + (1,) * (images.ndim - 1)
    view = view * torch.empty(shape, device=device).uniform_(0.8, 1.2)
    spread = images.float().std().clamp_min(1e-6)
    return (view + 0.05 * spread * torch.randn_like(view)).to(images.dtype)


class ContrastiveLearning(nn.Module):
    """SimCLR around any backbone with a Linear head (its input is the representation); see the module doc.

    Args:
        encoder: the backbone.
        projection_dim: output width of the two-layer projection head.
        temperature: NT-Xent temperature.
    """

    def __init__(self, encoder: nn.Module, projection_dim: int = 64, temperature: float = 0.2):
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        self._features = [FeatureExtractor(encoder)]  # a list: not a second registered copy of the encoder
        width = self._features[0].feature_dim
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, projection_dim))

    def forward(self, images: torch.Tensor) -> ModelOutput:
        views = torch.cat([random_view(images), random_view(images)])
        projections = self.projection(self._features[0](views))
        return ModelOutput(logits=projections, loss=nt_xent(projections, self.temperature))


def wrap_for_objective(encoder: nn.Module, stage) -> nn.Module:
    """The module a pretrain stage trains: ``encoder`` inside its objective."""
    if stage.objective == "mim":
        return MaskedImageModeling(encoder, stage.mask_ratio, stage.decoder_dim, stage.decoder_depth)
    return ContrastiveLearning(encoder, stage.projection_dim, stage.temperature)
