"""What the memory engine reports about one training step."""

from dataclasses import asdict, dataclass, field

# The six categories of the breakdown, in the order they are printed (tightfit.memory.tracker
# counts all but the device's overhead).
CATEGORIES = ("parameters", "gradients", "optimizer", "optimizer_temporaries", "activations", "overhead")


@dataclass
class StepMemory:
    """The peak memory of one steady-state training step and what it is made of.

    Attributes:
        peak_bytes: live tensor bytes at the peak plus the device overhead.
        breakdown: bytes per category at the peak; exactly the keys of ``CATEGORIES``, summing to
            ``peak_bytes``. ``optimizer_temporaries`` is what ``optimizer.step`` allocates besides
            its state (foreach kernels' outputs); ``activations`` is everything else live that is
            not a parameter, a gradient or optimizer state: saved activations, temporaries, the batch.
        by_module: bytes attributed to each top-level module (children of the model) at the peak:
            its parameters, gradients and optimizer state, and the activations allocated while its
            forward ran. ``(backward)`` holds temporaries allocated during backward that are not
            gradients yet, ``(other)`` what was allocated outside every module (loss, batch).
        flops: floating-point operations of one forward and backward pass of one micro-batch
            (``torch.utils.flop_counter``), or ``None`` when not counted.
        method: ``"estimated"`` (fake tensors, no memory used) or ``"measured"`` (real tensors).
        notes: how the figure was obtained, in words a person can read.
        peak_moment: when in the step the peak is: ``forward end``, ``backward`` or
            ``optimizer step`` (``tightfit.memory.tracker.MOMENTS``); None when not tracked.
        moment_peaks: live tensor bytes at each moment's own peak (no overhead).
    """

    peak_bytes: int
    breakdown: dict[str, int]
    by_module: dict[str, int] = field(default_factory=dict)
    flops: int | None = None
    method: str = "estimated"
    notes: list[str] = field(default_factory=list)
    peak_moment: str | None = None
    moment_peaks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [name for name in CATEGORIES if name not in self.breakdown]
        if missing or set(self.breakdown) != set(CATEGORIES):
            raise ValueError(f"breakdown must have exactly the keys {CATEGORIES}; got {sorted(self.breakdown)}")
        if sum(self.breakdown.values()) != self.peak_bytes:
            raise ValueError(
                f"breakdown sums to {sum(self.breakdown.values())} bytes, not peak_bytes={self.peak_bytes}"
            )

    @property
    def tensor_bytes(self) -> int:
        """The peak without the device overhead: what the tracker counts."""
        return self.peak_bytes - self.breakdown["overhead"]

    def to_dict(self) -> dict:
        """A JSON-ready dictionary with every field."""
        return asdict(self)
