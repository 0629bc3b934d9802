"""LoRA adapters for any PyTorch model, through PEFT.

LoRA (Hu et al. 2021) freezes a model and learns, next to chosen weight matrices ``W``, a low-rank
update ``(alpha / rank) * B @ A`` with ``A`` of shape ``rank x in`` and ``B`` of ``out x rank``
(``B`` starts at zero, so the adapted model starts as the base). Only the adapters (and a new
task head, when the model has one) train, which is what lets a 7B model or Stable Diffusion's UNet
be fine-tuned on a laptop.

The flow::

    model = build_model(...)                          # any nn.Module, even on the meta device
    model = apply_lora(model, LoRAConfig(rank=8))     # PEFT wraps the targets; prints the counts
    ... train ...                                     # only adapters have requires_grad
    save_adapters(model, run_dir / "adapters")        # adapter_model.safetensors + configs
    merged = merge_adapters(load_adapters(build_model(...), run_dir / "adapters"))

``target_modules: auto`` picks, in this order:

1. what the model asks for (a ``lora_target_modules()`` method, e.g. the diffusion wrapper, which
   keeps its frozen VAE and text encoder out of it);
2. diffusers attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
3. the Linear layers inside attention modules (a name part containing ``attn`` or
   ``attention``: q/k/v/o projections of Llama, BERT's query/key/value/output.dense, GPT-2's
   ``c_attn``/``c_proj``, CLIP's ``q_proj``...);
4. otherwise every Linear and Conv layer except the task head.

``modules_to_save: auto`` keeps a classification head trainable: HF heads named ``classifier``,
``score``, ``pre_classifier`` or ``qa_outputs``; for other models the last Linear layer unless its
weight is tied to an embedding (a language-model head is pretrained, not new).
"""

import difflib
import json
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tightfit._optional import import_bitsandbytes, is_available, require
from tightfit.errors import ConfigError, TightfitError
from tightfit.models.lora_config import LoRAConfig
from tightfit.models.qlora import BaseQuantization, quantize_base_model, resolve_quantize_base

DIFFUSERS_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
HF_TASK_HEADS = ("classifier", "score", "pre_classifier", "qa_outputs")
SUMMARY_FILE = "tightfit_lora.json"

_ATTENTION_PART = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass
class LoRASummary:
    """What :func:`apply_lora` did; kept on the returned model as ``model.lora_summary``."""

    trainable_parameters: int
    total_parameters: int
    target_modules: list[str]
    modules_to_save: list[str]
    rank: int
    alpha: float
    quantize_base: str | None = None
    notes: list[str] = field(default_factory=list)
    quant_backend: str | None = None
    base_model: str | None = None
    base_fingerprint: str | None = None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / max(self.total_parameters, 1)

    def line(self) -> str:
        """One line for people: counts, fraction, and what was adapted."""
        kinds = sorted({_module_kind(name) for name in self.target_modules})
        head = f", training in full: {', '.join(self.modules_to_save)}" if self.modules_to_save else ""
        backend = f" ({self.quant_backend})" if self.quant_backend else ""
        base = f", {self.quantize_base} base{backend}" if self.quantize_base else ""
        return (
            f"LoRA rank {self.rank} alpha {self.alpha:g} on {len(self.target_modules)} modules "
            f"({', '.join(kinds)}){head}{base}: {self.trainable_parameters:,} trainable of "
            f"{self.total_parameters:,} parameters ({100 * self.trainable_fraction:.2f}%)"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"trainable_fraction": self.trainable_fraction}


def _module_kind(name: str) -> str:
    """``"...attn1.to_out.0"`` -> ``"to_out.0"``, ``"...self_attn.q_proj"`` -> ``"q_proj"``."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit packed weights count their real elements."""
    trainable = total = 0
    for parameter in model.parameters():
        quant_state = getattr(parameter, "quant_state", None)
        numel = quant_state.shape.numel() if quant_state is not None else parameter.numel()
        total += numel
        if parameter.requires_grad:
            trainable += numel
    return trainable, total


def _is_adaptable(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight; PEFT supports it.
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or type(module).__name__ == "Conv1D"


def find_task_heads(model: nn.Module) -> list[str]:
    """Module names ``modules_to_save: auto`` keeps trainable (see the module doc)."""
    if hasattr(model, "lora_modules_to_save"):
        return list(model.lora_modules_to_save())
    children = dict(model.named_children())
    named_heads = [name for name in HF_TASK_HEADS if name in children]
    if named_heads or _is_transformers_model(model):
        return named_heads
    embedding_weights = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        return []
    name, last = linears[-1]
    return [] if id(last.weight) in embedding_weights else [name]


def _is_transformers_model(model: nn.Module) -> bool:
    return any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__)


def find_lora_targets(model: nn.Module, heads: list[str] | None = None) -> list[str]:
    """Qualified names of the modules ``target_modules: auto`` adapts (see the module doc).

    Args:
        model: the base model (real or meta).
        heads: modules trained in full, never adapted (default: :func:`find_task_heads`).

    Returns:
        Module names, in model order.

    Raises:
        ConfigError: when the model has no layer LoRA can adapt.
    """
    if hasattr(model, "lora_target_modules"):
        return list(model.lora_target_modules())
    heads = find_task_heads(model) if heads is None else heads

    def outside_heads(name: str) -> bool:
        return not any(name == head or name.startswith(head + ".") for head in heads)

    named = [(name, module) for name, module in model.named_modules() if name and outside_heads(name)]
    diffusers = [
        name
        for name, module in named
        if isinstance(module, nn.Linear) and name.endswith(tuple("." + t for t in DIFFUSERS_ATTENTION_TARGETS))
    ]
    if diffusers:
        return diffusers
    attention = [
        name
        for name, module in named
        if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
        and any(_ATTENTION_PART.search(part) for part in name.split(".")[:-1])
    ]
    if attention:
        return attention
    everything = [name for name, module in named if _is_adaptable(module)]
    if not everything:
        raise ConfigError(
            f"{type(model).__name__} has no Linear or Conv layer for LoRA to adapt; "
            "name the modules in lora.target_modules"
        )
    return everything


def _resolve_names(model: nn.Module, names: list[str], what: str) -> list[str]:
    """Expand suffix names to qualified module names; ConfigError naming an unknown one."""
    module_names = [name for name, _ in model.named_modules() if name]
    resolved = []
    for wanted in names:
        matches = [name for name in module_names if name == wanted or name.endswith("." + wanted)]
        if not matches:
            leaf_names = sorted({name.rsplit(".", 1)[-1] for name in module_names} | set(module_names))
            close = difflib.get_close_matches(wanted, leaf_names, n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(f"lora.{what}: no module named {wanted!r} in {type(model).__name__}{hint}")
        resolved.extend(match for match in matches if match not in resolved)
    return resolved


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def apply_lora(
    model: nn.Module,
    config: LoRAConfig | dict,
    *,
    device: str | torch.device | None = None,
    verbose: bool = True,
    base_model: str | None = None,
    precision: str | None = None,
) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters to it through PEFT; only adapters (and heads) train.

    Works on real and meta-device models (the planner plans a 7B LoRA without weights); a
    quantized base (``quantize_base``) needs real weights.

    Args:
        model: any ``nn.Module``: transformers, diffusers, torchvision or a plain module.
        config: a :class:`LoRAConfig` or its dict.
        device: where the run trains: the quantized base is chosen for it and built on it
            (default: the model's device; never CUDA just because CUDA is present).
        verbose: print the one-line summary (trainable/total parameters).
        base_model: the spec the base was built from, recorded with every checkpoint so a
            resume (or ``generate``) knows what to rebuild.
        precision: the run's precision (``step.precision``): the dtype of the NF4 matmul.

    Returns:
        The PEFT-wrapped model; its ``lora_summary`` attribute is a :class:`LoRASummary`.

    Raises:
        ConfigError: for bad settings or module names (the message names the closest module).
        MissingExtraError: when PEFT is not installed.

    Example:
        >>> model = apply_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), LoRAConfig(rank=2))
        >>> model.lora_summary.trainable_parameters
        50
    """
    peft = _require_peft()
    config = _validated(config)
    if isinstance(model, peft.PeftModel):
        raise ConfigError("this model already has LoRA adapters; apply_lora takes the base model")

    heads = (
        find_task_heads(model)
        if config.modules_to_save == "auto"
        else _resolve_names(model, config.modules_to_save, "modules_to_save")
    )
    if config.target_modules == "auto":
        targets = find_lora_targets(model, heads)
    else:
        targets = _resolve_names(model, config.target_modules, "target_modules")
    notes: list[str] = []
    fingerprint = base_fingerprint(model)  # before quantizing: the same base gives the same int8 weights

    quantization = BaseQuantization(None)
    if config.quantize_base is not None:
        is_meta = any(parameter.is_meta for parameter in model.parameters())
        device = torch.device(device) if device is not None else _model_device(model)
        # a meta model is planned, not run: the backend is the target's, whatever is installed here
        target_type = "cpu" if device.type == "meta" else device.type
        quantization = resolve_quantize_base(
            config.quantize_base, target_type, config.quant_backend, check_installed=not is_meta
        )
        notes.append(quantization.line())
        if verbose:
            print(f"tightfit: {quantization.line()}")
        if is_meta:
            notes.append(f"meta model: the {quantization.method} base is counted by the planner, not built")
        else:
            quantize_base_model(
                model, quantization.method, skip=heads, device=device, backend=quantization.backend, precision=precision
            )
    quantize_base = quantization.method

    peft_config = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias=config.bias,
        modules_to_save=heads or None,
    )
    with warnings.catch_warnings():
        # PEFT warns that an int8 (torchao) base cannot be merged in place; tightfit merges
        # adapters into a freshly built full-precision base instead (merge_adapters, lora merge).
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        wrapped = peft.get_peft_model(model, peft_config)
    trainable, total = count_parameters(wrapped)
    summary = LoRASummary(
        trainable_parameters=trainable,
        total_parameters=total,
        target_modules=targets,
        modules_to_save=heads,
        rank=config.rank,
        alpha=config.alpha,
        quantize_base=quantize_base,
        quant_backend=quantization.backend,
        notes=notes,
        base_model=base_model,
        base_fingerprint=fingerprint,
    )
    wrapped.lora_summary = summary
    wrapped.tightfit_lora_config = config
    if verbose:
        print(f"tightfit: {summary.line()}")
    return wrapped


def _require_peft():
    """PEFT, with bitsandbytes (when installed) imported first the offline way: PEFT imports it
    itself when it wraps a layer, which would let bitsandbytes look for a hub kernel and say so."""
    if is_available("bitsandbytes"):
        import_bitsandbytes()
    return require("peft", extra="hf", purpose="LoRA fine-tuning")


def _validated(config: LoRAConfig | dict) -> LoRAConfig:
    if isinstance(config, LoRAConfig):
        return config
    from pydantic import ValidationError

    from tightfit.settings import describe_validation_error

    try:
        return LoRAConfig.model_validate(config)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, LoRAConfig, prefix="lora")) from None


def _require_peft_model(model: nn.Module, action: str):
    peft = _require_peft()
    if not isinstance(model, peft.PeftModel):
        raise TightfitError(f"cannot {action}: the model has no LoRA adapters (use apply_lora first)")
    return peft


def save_adapters(model: nn.Module, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Save the adapters (and trainable heads) as safetensors, plus a tightfit summary.

    Writes ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT's format, loadable by
    PEFT alone) and ``tightfit_lora.json`` (the LoRA settings and the counts).

    Args:
        model: a model returned by :func:`apply_lora`.
        directory: created if missing; files in it with the same names are replaced.
        state_dict: the weights to take the adapters from, when the model's own are sharded
            (FSDP: gathered whole by the trainer); default ``model.state_dict()``.

    Returns:
        The directory.
    """
    _require_peft_model(model, "save adapters")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
    summary = getattr(model, "lora_summary", None)
    config = getattr(model, "tightfit_lora_config", None)
    payload = {
        "lora": config.model_dump() if config is not None else None,
        "summary": summary.to_dict() if summary is not None else None,
    }
    (directory / SUMMARY_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    return directory


def load_adapters(base_model: nn.Module, directory: str | Path, *, trainable: bool = False) -> nn.Module:
    """Put adapters saved by :func:`save_adapters` on a freshly built base model.

    Args:
        base_model: the same architecture the adapters were trained on, with its base weights.
        directory: the adapter directory (``adapter_model.safetensors``, ``adapter_config.json``).
        trainable: keep the adapters trainable (to resume training) instead of inference mode.

    Returns:
        The PEFT-wrapped model, in eval mode unless ``trainable``.

    Raises:
        TightfitError: when the directory holds no adapters.
    """
    peft = _require_peft()
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise TightfitError(f"{directory}: no LoRA adapters here (adapter_config.json is missing)")
    try:  # PEFT reads adapter_model.safetensors, or a .bin with torch.load(weights_only=True)
        model = peft.PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)
    except (OSError, ValueError, pickle.UnpicklingError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TightfitError(f"{directory}: the adapters cannot be loaded safely ({text})") from None
    saved = _saved_summary(directory)
    if saved:
        fields = set(LoRASummary.__dataclass_fields__)
        model.lora_summary = LoRASummary(**{key: value for key, value in saved.items() if key in fields})
    else:  # adapters saved by PEFT alone: what its config says
        peft_config = model.peft_config["default"]
        trainable, total = count_parameters(model)
        model.lora_summary = LoRASummary(
            trainable,
            total,
            sorted(peft_config.target_modules or []),
            list(peft_config.modules_to_save or []),
            peft_config.r,
            peft_config.lora_alpha,
        )
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights: ``W + (alpha / rank) * B @ A``.

    The result is the plain base architecture (no PEFT wrapper, no extra latency at inference),
    with trained heads in place.

    Raises:
        TightfitError: when the model has no adapters.
    """
    _require_peft_model(model, "merge adapters")
    return model.merge_and_unload()


# ---------------------------------------------------------------------------------- adapters-only checkpoints
FINGERPRINT_SAMPLES = 4096  # elements hashed per tensor: enough to tell two inits or two checkpoints apart


def base_fingerprint(model: nn.Module) -> str | None:
    """A SHA-256 over every tensor of the base model: name, shape, dtype and an evenly strided
    sample of :data:`FINGERPRINT_SAMPLES` of its values (the whole tensor when smaller).

    It identifies a base without hashing 14 GB of a 7B model at every checkpoint: a different
    seed, initialisation or weight file changes it. ``None`` for a meta model (nothing to hash).

    Example:
        >>> base_fingerprint(nn.Linear(4, 4)) == base_fingerprint(nn.Linear(4, 4))   # two random inits
        False
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            return None
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::stride][:FINGERPRINT_SAMPLES].contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _saved_summary(directory: Path) -> dict:
    summary_file = directory / SUMMARY_FILE
    return (json.loads(summary_file.read_text()).get("summary") or {}) if summary_file.is_file() else {}


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` came from :func:`apply_lora` or :func:`load_adapters` (not merged)."""
    return getattr(model, "lora_summary", None) is not None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of a LoRA run holds: the trainable parameters (adapters, trained heads,
    biases with ``bias: all``) and the buffers (batch-norm statistics move in a frozen base too).

    The frozen base weights, quantized or not, are left out: they are rebuilt from the base's spec
    and checked against :func:`base_fingerprint`. Names are the model's ``state_dict`` keys.
    """
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in model.state_dict().items() if name in trainable or name in buffers}


def adapter_checkpoint_metadata(model: nn.Module) -> dict[str, str]:
    """The facts written beside the adapter weights (safetensors metadata: strings only)."""
    summary = model.lora_summary
    return {
        "base_model": summary.base_model or "",
        "base_fingerprint": summary.base_fingerprint or "",
        "quantize_base": summary.quantize_base or "",
    }


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> None:
    """Load an adapters-only checkpoint into a LoRA model whose base was rebuilt.

    Raises:
        TightfitError: the model has no adapters, its base is not the one the checkpoint was
            trained on (fingerprints differ), or the keys do not match.
    """
    if not is_lora_model(model):
        raise TightfitError(
            f"{where}: an adapters-only checkpoint needs the model with its LoRA adapters (a lora: section)"
        )
    saved = metadata.get("base_fingerprint") or None
    current = model.lora_summary.base_fingerprint
    if saved and current and saved != current:
        raise TightfitError(
            f"{where}: the base model rebuilt from {metadata.get('base_model') or 'the config'} differs from the one "
            f"these adapters were trained on (fingerprint {current[:12]} != {saved[:12]}); same spec, weights and "
            "seed needed"
        )
    model_keys = set(model.state_dict())
    unexpected = sorted(set(state) - model_keys)
    missing = sorted(
        name for name, parameter in model.named_parameters() if parameter.requires_grad and name not in state
    )
    if unexpected or missing:
        example = unexpected[0] if unexpected else missing[0]
        raise TightfitError(
            f"{where}: the adapters do not match the model ({len(unexpected)} unexpected, {len(missing)} missing "
            f"keys, e.g. {example})"
        )
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------- run directories
ADAPTERS_DIR = "adapters"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's name; the only adapter file tightfit reads


def _check_adapter_weights(directory: Path) -> None:
    """Refuse adapters whose weights are not a readable ``adapter_model.safetensors`` (a ``.bin`` is a pickle)."""
    from safetensors import SafetensorError, safe_open

    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise TightfitError(
                f"{directory / 'adapter_model.bin'}: refused: a .bin is a pickle, and unpickling a file someone handed "
                f"you can run code; tightfit reads adapters only from {ADAPTER_WEIGHTS} (re-save them with "
                "save_pretrained(..., safe_serialization=True))"
            )
        raise TightfitError(f"{directory}: adapter_config.json but no {ADAPTER_WEIGHTS} beside it")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError, ValueError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TightfitError(f"{weights}: not a readable safetensors file ({text}); the adapters are damaged") from None


def adapter_dir(path: str | Path) -> Path:
    """The adapter folder of a run directory (``RUN_DIR/adapters``) or the folder itself.

    Raises:
        TightfitError: when neither holds ``adapter_config.json``, or its weights are missing,
            damaged or a pickle (``adapter_model.bin``).
    """
    path = Path(path).expanduser()
    for candidate in (path / ADAPTERS_DIR, path):
        if (candidate / "adapter_config.json").is_file():
            _check_adapter_weights(candidate)
            return candidate
    if not path.exists():
        raise TightfitError(f"{path}: no such run directory")
    raise TightfitError(
        f"{path}: no LoRA adapters (expected {ADAPTERS_DIR}/adapter_config.json; was the run trained with a lora: "
        "section?)"
    )
