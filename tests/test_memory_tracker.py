"""The memory tracker: exact byte counts against hand-computed sizes, the budget, OOM recognition."""

import pytest
import torch
from torch import nn

from tightfit.memory.oom import is_out_of_memory
from tightfit.memory.report import StepMemory
from tightfit.memory.tracker import MemoryTracker
from tightfit.step.loss import forward_and_loss

LINEAR_PARAM_BYTES = (1000 * 1000 + 1000) * 4  # weight + bias, fp32


def _step(model, optimizer, batch_size=8):
    optimizer.zero_grad(set_to_none=True)
    batch = (torch.randn(batch_size, 1000), torch.randint(0, 10, (batch_size,)))
    _, loss = forward_and_loss(model, batch)
    loss.backward()
    optimizer.step()


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(1000, 1000)


def test_sgd_parameters_and_gradients_are_exact(linear):
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    _step(linear, optimizer)  # warm-up
    with MemoryTracker(linear, optimizer) as tracker:
        _step(linear, optimizer)
    assert tracker.breakdown["parameters"] == LINEAR_PARAM_BYTES
    assert tracker.breakdown["gradients"] == LINEAR_PARAM_BYTES
    assert tracker.breakdown["optimizer"] == 0
    assert tracker.breakdown["overhead"] == 0
    # Batch 8: input 8x1000 fp32, output 8x1000, plus small temporaries; far below one weight matrix.
    assert 0 < tracker.breakdown["activations"] < 200_000
    assert sum(tracker.breakdown.values()) == tracker.peak_bytes


def test_adam_state_is_two_copies_plus_step_counters(linear):
    optimizer = torch.optim.Adam(linear.parameters())
    _step(linear, optimizer)
    with MemoryTracker(linear, optimizer) as tracker:
        _step(linear, optimizer)
    # exp_avg and exp_avg_sq per parameter, plus one fp32 scalar ``step`` tensor per parameter.
    assert tracker.breakdown["optimizer"] == 2 * LINEAR_PARAM_BYTES + 2 * 4


def test_foreach_update_temporaries_are_their_own_category_and_name_the_peak_moment(linear):
    optimizer = torch.optim.AdamW(linear.parameters(), foreach=True)
    _step(linear, optimizer)
    with MemoryTracker(linear, optimizer) as tracker:
        _step(linear, optimizer)
    # the foreach update allocates whole-model temporaries (sqrt of every second moment, ...):
    # at least one weight-sized copy, none of it an activation
    assert tracker.peak_moment == "optimizer step"
    assert tracker.breakdown["optimizer_temporaries"] >= LINEAR_PARAM_BYTES
    assert tracker.breakdown["activations"] < 200_000
    assert tracker.moment_peaks["optimizer step"] == tracker.peak_bytes > tracker.moment_peaks["backward"]
    assert set(tracker.moment_peaks) == {"forward end", "backward", "optimizer step"}


def test_plain_sgd_peaks_in_backward_without_optimizer_temporaries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 1000))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, optimizer)
    with MemoryTracker(model, optimizer) as tracker:
        _step(model, optimizer)
    assert tracker.peak_moment == "backward" and tracker.breakdown["optimizer_temporaries"] == 0
    # at the first layer's gradients, with the second layer's already .grad
    assert tracker.peak_bytes == 4 * LINEAR_PARAM_BYTES + tracker.breakdown["activations"]
    assert tracker.moment_peaks["forward end"] < tracker.moment_peaks["backward"]


def test_momentum_buffer_is_one_copy(linear):
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    _step(linear, optimizer)
    with MemoryTracker(linear, optimizer) as tracker:
        _step(linear, optimizer)
    assert tracker.breakdown["optimizer"] == LINEAR_PARAM_BYTES


def test_storages_before_the_block_are_counted(linear):
    optimizer = torch.optim.Adam(linear.parameters())
    _step(linear, optimizer)  # leaves gradients and optimizer state alive
    with MemoryTracker(linear, optimizer) as tracker:
        at_entry = tracker.live_bytes
    assert at_entry == LINEAR_PARAM_BYTES * 4 + 2 * 4  # params, grads, exp_avg, exp_avg_sq, steps


def test_views_are_free_and_frees_are_subtracted():
    with MemoryTracker() as tracker:
        base = torch.empty(1000)  # 4000 bytes
        views = [base[:10], base.view(10, 100), base.t() if base.ndim == 2 else base.unsqueeze(0)]
        assert tracker.live_bytes == 4000
        other = torch.empty(250, dtype=torch.float64)  # 2000 bytes
        assert tracker.live_bytes == 6000
        del base, views
        assert tracker.live_bytes == 2000  # the storage died with its last view
        del other
    assert tracker.peak_bytes == 6000
    assert tracker.live_bytes == 0


def test_peak_is_attributed_to_top_level_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 4000), nn.ReLU(), nn.Linear(4000, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = (torch.randn(32, 100), torch.randint(0, 10, (32,)))
    with MemoryTracker(model, optimizer) as tracker:
        optimizer.zero_grad(set_to_none=True)
        _, loss = forward_and_loss(model, batch)
        loss.backward()
        optimizer.step()
    by_module = tracker.by_module
    assert sum(by_module.values()) == tracker.peak_bytes
    # Module 0 owns its weight and its gradient at least: 2 x (100*4000 + 4000) fp32.
    assert by_module["0"] >= 2 * (100 * 4000 + 4000) * 4
    # Module 2 owns its weight (4000*10 + 10 fp32) and its gradient.
    assert by_module["2"] >= 2 * (4000 * 10 + 10) * 4
    assert set(by_module) <= {"0", "1", "2", "(backward)", "(other)"}
    # No hooks stay behind after the block.
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def test_budget_raises_the_real_out_of_memory_error_in_forward_and_backward(linear):
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    # Params (4 MB) fit, a forward output of 8x1000 fits, the weight gradient (4 MB) does not.
    with pytest.raises(torch.OutOfMemoryError, match="simulated out of memory"):
        with MemoryTracker(linear, optimizer, budget_bytes=LINEAR_PARAM_BYTES + 500_000):
            _step(linear, optimizer)
    linear.zero_grad(set_to_none=True)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        with MemoryTracker(budget_bytes=1000):
            torch.empty(1000)
    assert type(caught.value) is torch.OutOfMemoryError
    assert is_out_of_memory(caught.value)


def test_budget_that_fits_changes_nothing(linear):
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1)
    _step(linear, optimizer)
    with MemoryTracker(linear, optimizer) as free:
        _step(linear, optimizer)
    with MemoryTracker(linear, optimizer, budget_bytes=free.peak_bytes) as limited:
        _step(linear, optimizer)
    assert limited.peak_bytes == free.peak_bytes
    with pytest.raises(torch.OutOfMemoryError):
        with MemoryTracker(linear, optimizer, budget_bytes=free.peak_bytes - 1):
            _step(linear, optimizer)


def test_allocation_size_rounds_like_a_device_allocator():
    with MemoryTracker(allocation_size=lambda n: -(-n // 512) * 512) as tracker:
        keep = [torch.empty(10, dtype=torch.uint8) for _ in range(3)]
    assert tracker.peak_bytes == 30
    assert tracker.peak_allocated_bytes == 3 * 512
    del keep


def test_is_out_of_memory_on_real_and_synthetic_errors():
    with pytest.raises(RuntimeError) as real_cpu:
        torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator refuses 4 EiB
    assert is_out_of_memory(real_cpu.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(
        RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 0 bytes)")
    )
    assert is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate 8 bytes"
        )
    )
    assert is_out_of_memory(MemoryError())
    try:
        try:
            raise RuntimeError("MPS backend out of memory")
        except RuntimeError as inner:
            raise ValueError("the step failed") from inner
    except ValueError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x3 and 4x5)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a runtime error of a device
    assert not is_out_of_memory(KeyError("cuda"))


def test_step_memory_checks_its_breakdown():
    breakdown = {
        "parameters": 1,
        "gradients": 2,
        "optimizer": 3,
        "optimizer_temporaries": 0,
        "activations": 4,
        "overhead": 5,
    }
    memory = StepMemory(peak_bytes=15, breakdown=breakdown, method="measured")
    assert memory.tensor_bytes == 10
    assert memory.to_dict()["breakdown"] == breakdown
    with pytest.raises(ValueError, match="sums to"):
        StepMemory(peak_bytes=16, breakdown=breakdown)
    with pytest.raises(ValueError, match="exactly the keys"):
        StepMemory(peak_bytes=10, breakdown={"parameters": 10})


class _MlpBlock(nn.Module):
    """A transformer-like residual block: x + fc2(relu(fc1(x))), hidden width 4 * dim."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _MlpStack(nn.Module):
    def __init__(self, dim, depth):
        super().__init__()
        self.blocks = nn.ModuleList(_MlpBlock(dim) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_checkpointing_lowers_the_peak_with_flops_counted():
    # The step counts FLOPs. FlopCounterMode's ModuleTracker hooks every module call's tensors in
    # a reference cycle (grad_fn -> hook -> list of grad_fns); for the graphs built while blocks
    # are recomputed in backward, which never run, that kept every recomputed block alive until
    # the step ended: checkpointing lowered nothing (12 hidden activations instead of ~5 here).
    from tightfit.memory.estimator import estimate_step
    from tightfit.memory.measure import measure_step

    rows, dim, depth = 1024, 32, 8
    boundary = rows * dim * 4  # one block input/output, fp32
    hidden = rows * 4 * dim * 4  # one hidden activation of a block

    def factory():
        torch.manual_seed(0)
        return _MlpStack(dim, depth)

    def batch_factory(batch_size, device):
        return torch.randn(batch_size, dim, device=device)

    plain = measure_step(factory, batch_factory, batch_size=rows, optimizer="sgd", device="cpu")
    # Without checkpointing each block keeps its input and two hidden activations (fc1's output
    # for relu, relu's output for fc2).
    assert plain.breakdown["activations"] >= depth * (boundary + 1 * hidden)
    for run in (measure_step, estimate_step):
        kwargs = {"device": "cpu"} if run is measure_step else {}
        checkpointed = run(factory, batch_factory, batch_size=rows, optimizer="sgd", checkpointing=True, **kwargs)
        assert checkpointed.flops > plain.flops  # the recomputation was counted
        # Checkpointed: the batch, the block boundaries and the loss's input, plus one block
        # recomputed (its relu output) and the backward temporaries of that block (gradients of
        # its output, hidden activations and input).
        bound = (depth + 2) * boundary + hidden + 3 * hidden + 2 * boundary
        assert checkpointed.breakdown["activations"] <= bound, (run.__name__, checkpointed.breakdown)
        assert checkpointed.breakdown["activations"] < 0.5 * plain.breakdown["activations"]
