"""A model as a feature extractor: which layer, how it is pooled, and which weights it carries.

The default feature is the input of the model's last ``nn.Linear`` (the pooled, penultimate
representation: a ResNet's 2048 pooled channels, a ViT's normalised [CLS] token, the digits CNN's
128 pooled channels). ``layer: NAME`` takes that module's output instead, pooled over its spatial
or token axes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tightfit.errors import ConfigError

POOLINGS = ("auto", "cls", "mean", "max", "flatten")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Where a named pretrained file comes from, for the error when it is not on disk (torchvision's own file names).
KNOWN_WEIGHTS = {
    "torchvision:resnet50": "resnet50-11ad3fa6.pth (torchvision ResNet50_Weights.IMAGENET1K_V2)",
    "torchvision:vit_b_16": "vit_b_16-c867db91.pth (torchvision ViT_B_16_Weights.IMAGENET1K_V1)",
}


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first-layer kernel ``(out, 3, *k)`` for ``channels`` inputs, as timm's ``adapt_input_conv`` does.

    One channel: the RGB kernels summed (a grey image is R = G = B, so the response is unchanged).
    Otherwise: the RGB kernels repeated to ``channels`` and scaled by ``3 / channels``, so the
    summed response to an input of equal channels keeps its size.
    """
    if weight.shape[1] == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-channels // weight.shape[1])
    return weight.repeat(1, repeats, *([1] * (weight.ndim - 2)))[:, :channels] * (weight.shape[1] / channels)


def first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The model's first convolution (a ResNet's stem, a ViT's patch embedding), or None."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return name, module
    return None


def adapt_input_channels(model: nn.Module, channels: int) -> str | None:
    """Give the model's first convolution ``channels`` inputs, its weights adapted (:func:`adapt_input_conv`).

    Returns:
        A note for the stage, or None when the channels already match.
    """
    found = first_conv(model)
    if found is None or found[1].in_channels == channels:
        return None
    name, conv = found
    replacement = type(conv)(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    with torch.no_grad():
        replacement.weight.copy_(adapt_input_conv(conv.weight, channels))
        if conv.bias is not None:
            replacement.bias.copy_(conv.bias)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], replacement)
    rule = "RGB kernels summed" if channels == 1 else f"RGB kernels repeated, scaled by 3/{channels}"
    return f"first layer {name} adapted from {conv.in_channels} to {channels} input channels ({rule}, as timm does)"


class Normalize(nn.Module):
    """ImageNet's per-channel mean and std for 3 channels; their averages for any other count (as for
    adapted kernels).
    """

    def __init__(self, channels: int):
        super().__init__()
        mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,) * channels
        std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,) * channels
        self.register_buffer("mean", torch.tensor(mean).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, channels, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        shape = (1, images.shape[1]) + (1,) * (images.ndim - 2)
        return (images - self.mean.view(shape)) / self.std.view(shape)


def last_linear(model: nn.Module) -> str:
    """The name of the model's last ``nn.Linear`` (its classifier head).

    Raises:
        ConfigError: the model has no Linear layer (then ``layer:`` must name one).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ConfigError("layer: the model has no Linear head; name the feature layer with layer: NAME")
    return names[-1]


def pool(tensor: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(batch, ...)`` -> ``(batch, features)``.

    Token outputs ``(batch, tokens, dim)``: ``auto``/``cls`` take the first token, ``mean``/``max``
    pool over tokens. Feature maps ``(batch, channels, *spatial)``: ``auto``/``mean`` average the
    spatial axes, ``max`` takes their maximum. ``flatten`` keeps everything.
    """
    if tensor.ndim == 2 or pooling == "flatten":
        return tensor.flatten(1)
    if tensor.ndim == 3:
        if pooling in ("auto", "cls"):
            return tensor[:, 0]
        return tensor.mean(1) if pooling == "mean" else tensor.amax(1)
    if pooling == "cls":
        raise ConfigError(f"pooling: cls needs token outputs (batch, tokens, dim), got shape {tuple(tensor.shape)}")
    spatial = tuple(range(2, tensor.ndim))
    return tensor.amax(spatial) if pooling == "max" else tensor.mean(spatial)


class FeatureExtractor(nn.Module):
    """``forward(x)`` runs the whole model and returns the pooled feature of one layer.

    Args:
        model: the backbone.
        layer: a module name whose *output* is the feature; None: the *input* of the last Linear.
        pooling: see :func:`pool`.
    """

    def __init__(
        self, model: nn.Module, layer: str | None = None, pooling: str = "auto", normalize: nn.Module | None = None
    ):
        super().__init__()
        self.model = model
        self.normalize = normalize
        self.pooling = pooling
        modules = dict(model.named_modules())
        if layer is not None and layer not in modules:
            import difflib

            close = difflib.get_close_matches(layer, list(modules), n=1, cutoff=0.5)
            raise ConfigError(
                f"layer: the model has no module {layer!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            )
        self.layer = layer or last_linear(model)
        self._captured: torch.Tensor | None = None
        target = modules[self.layer]
        if layer is None:
            target.register_forward_pre_hook(self._capture_input)
        else:
            target.register_forward_hook(self._capture_output)

    def _capture_input(self, module, args):
        self._captured = args[0]

    def _capture_output(self, module, args, output):
        self._captured = output[0] if isinstance(output, (tuple, list)) else output

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.model(self.normalize(inputs) if self.normalize is not None else inputs)
        features, self._captured = self._captured, None
        return pool(features, self.pooling)

    @property
    def feature_dim(self) -> int:
        """Width of the default feature (the last Linear's input); only for ``layer=None``."""
        return dict(self.model.named_modules())[self.layer].in_features


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file, a tensor-only ``torch.save`` file, or a tightfit run folder.

    A run folder gives its best checkpoint, else its newest intact one. Nothing is unpickled
    (``weights_only=True``).

    Raises:
        ConfigError: a file that is damaged or holds pickled objects, naming it.
    """
    import pickle
    import warnings

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            from tightfit.runs.checkpoint import read_newest_intact

            return read_newest_intact(path / "checkpoints", first="best")[0]
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would add lines to the refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"weights: {path} holds pickled Python objects, which a safe load refuses to build; "
            "give a .safetensors file or a tensor-only torch.save file"
        ) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"weights: {path} is not a readable weights file ({text})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], *, prefix: str = "") -> None:
    """Load ``state`` into ``model``; keys under ``prefix`` (``encoder.`` of a pre-training wrapper) only.

    Raises:
        ConfigError: keys or shapes do not match, naming the first offending key.
    """
    if prefix:
        state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    found = first_conv(model)
    if found is not None and f"{found[0]}.weight" in state:  # RGB weights into a model built for other channels
        key = f"{found[0]}.weight"
        state = {**state, key: adapt_input_conv(state[key], found[1].in_channels)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ConfigError(f"weights: do not match the model ({detail[:200]})") from None
