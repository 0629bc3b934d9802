"""The largest batch size whose estimated peak fits: the one search the planner and the batch-size
search share.

The peak never decreases with the batch size, so this is a search over a monotone predicate,
kept as a bracket ``low`` (fits) .. ``high`` (does not). Each probe is a prediction from the last
estimate: activations grow linearly with the batch (times ``growth``, the device's fragmentation
share), while parameters, gradients and optimizer state do not, so the next probe is
``batch + (threshold - peak) / (activations per sample)``. In the common case that is four
estimates: the first probe, the prediction from it, the refined prediction and its neighbour;
bisection takes over when predictions stop narrowing the bracket. A ``hint`` (for example half the
answer of a configuration that uses at most twice the memory per sample) replaces ``lowest`` as
the first probe and usually saves one estimate.
"""

import math
from collections.abc import Callable

from tightfit.memory.report import StepMemory


class _Untraceable(Exception):
    """An estimate that could not be made: the search has no answer."""


def largest_fitting(
    estimate: Callable[[int], StepMemory | None],
    threshold: float,
    *,
    highest: int,
    lowest: int = 1,
    hint: int | None = None,
    growth: float = 1.0,
) -> int | None:
    """The largest batch in ``[lowest, highest]`` whose estimated peak is at most ``threshold``.

    Args:
        estimate: ``batch -> StepMemory`` (the caller caches); None when it cannot be estimated.
        threshold: the bytes a batch must fit in.
        highest, lowest: the range searched.
        hint: a first probe inside the range.
        growth: activation bytes grow by this factor more than the tracked tensors (fragmentation).

    Returns:
        The batch size; ``lowest - 1`` when not even ``lowest`` fits; None when an estimate failed.
    """

    def peak(batch: int) -> int:
        memory = estimate(batch)
        if memory is None:
            raise _Untraceable
        return memory.peak_bytes

    def predict(batch: int) -> int:
        memory = estimate(batch)
        per_sample = memory.breakdown["activations"] / batch * growth
        if per_sample <= 0:
            return 2 * batch
        return batch + math.floor((threshold - memory.peak_bytes) / per_sample)

    try:
        low, high = lowest, highest + 1  # high stands for "beyond the search" until something fails
        if hint is not None and lowest < hint <= highest and peak(hint) <= threshold:
            low = hint  # the peak is monotone: everything below fits too
        elif peak(lowest) > threshold:
            return lowest - 1
        elif hint is not None and lowest < hint <= highest:
            high = hint
        probe, probes = predict(low), 0
        while high - low > 1:
            probe = max(low + 1, min(probe, high - 1))
            if peak(probe) <= threshold:
                low = probe
            else:
                high = probe
            probes += 1
            predicted = predict(probe)
            if probes >= 4:
                probe = (low + high) // 2
            elif predicted == probe:  # the prediction confirms the probe: check its neighbour
                probe = probe + 1 if probe == low else probe - 1
            else:
                probe = predicted
        return low
    except _Untraceable:
        return None
