"""Batch-size search: the true maximum under a budget, few trial steps, state left untouched; the CLI."""

import copy
import json
import random

import numpy
import pytest
import torch
from torch import nn

from tightfit.cli import main
from tightfit.errors import ConfigError
from tightfit.memory.measure import measure_step
from tightfit.plan.search import find_batch_size


def mlp():
    return nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))


def batch_factory(batch_size, device):
    return torch.randn(batch_size, 64, device=device), torch.randint(0, 10, (batch_size,), device=device)


def brute_force_max(model, factory, budget_bytes, target_bytes, start, optimizer="adamw"):
    """The largest batch whose measured peak fits ``target_bytes``, by trying every size from ``start``."""
    largest = 0
    batch_size = start
    while True:
        try:
            peak = measure_step(
                copy.deepcopy(model),
                factory,
                batch_size=batch_size,
                device="cpu",
                budget_bytes=budget_bytes,
                optimizer=optimizer,
            ).peak_bytes
        except torch.OutOfMemoryError:
            peak = None
        if peak is None or peak > target_bytes:
            return largest
        largest = batch_size
        batch_size += 1


@pytest.fixture
def model():
    torch.manual_seed(0)
    return mlp()


def test_finds_the_true_maximum_with_few_trials(model):
    budget = 2_000_000
    result = find_batch_size(model, batch_factory, budget_bytes=budget, device="cpu", margin=0.1)
    assert result.target_bytes == int(budget * 0.9)
    assert 1 <= len(result.trials) <= 3
    assert result.predicted_batch_size is not None
    assert result.peak_bytes <= result.target_bytes
    # The truth, by brute force from a few below the answer (every size below fits if these do).
    assert (
        brute_force_max(model, batch_factory, budget, result.target_bytes, start=max(1, result.batch_size - 2))
        == result.batch_size
    )
    assert result.batch_size > 20  # the budget holds a real batch, not a degenerate one


def test_state_is_restored_and_the_random_streams_continue(model):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    model(torch.randn(4, 64)).sum().backward()  # a gradient the search must not lose
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    grads_before = [p.grad.clone() for p in model.parameters()]
    parameters_before = [id(p) for p in model.parameters()]
    state = (torch.get_rng_state(), random.getstate(), numpy.random.get_state())

    find_batch_size(model, batch_factory, budget_bytes=1_500_000, device="cpu")

    after_search = (torch.rand(3), random.random(), numpy.random.rand())
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    numpy.random.set_state(state[2])
    expected = (torch.rand(3), random.random(), numpy.random.rand())
    assert torch.equal(after_search[0], expected[0]) and after_search[1:] == expected[1:]
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, model.parameters()))
    assert [id(p) for p in model.parameters()] == parameters_before  # the user's optimizer still points at them
    assert model.training


def test_untraceable_models_fall_back_to_doubling():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, inputs):
            logits = self.net(inputs)
            if logits.sum().item() > 1e9:  # a data-dependent branch fake tensors cannot follow
                return logits * 2
            return logits

    torch.manual_seed(0)
    model = Untraceable()
    budget = 1_500_000
    result = find_batch_size(model, batch_factory, budget_bytes=budget, device="cpu", max_batch_size=512)
    assert result.predicted_batch_size is None
    assert any("doubling" in note for note in result.notes)
    assert (
        brute_force_max(model, batch_factory, budget, result.target_bytes, start=max(1, result.batch_size - 1))
        == result.batch_size
    )


def test_a_budget_too_small_for_one_sample_gives_zero(model):
    result = find_batch_size(model, batch_factory, budget_bytes=10_000, device="cpu")
    assert result.batch_size == 0 and result.peak_bytes == 0
    assert result.trials and not result.trials[0]["fits"]


def test_bad_arguments_are_config_errors(model):
    with pytest.raises(ConfigError, match="on CPU"):
        find_batch_size(model, batch_factory, device="cpu")
    with pytest.raises(ConfigError, match="margin"):
        find_batch_size(model, batch_factory, budget_bytes=10**6, device="cpu", margin=1.5)
    with pytest.raises(ConfigError, match="max_batch_size"):
        find_batch_size(model, batch_factory, budget_bytes=10**6, device="cpu", max_batch_size=0)


def test_cli_json(capsys):
    code = main(
        ["batch-size", "--model", "builtin:mlp", "--input", "64", "--memory", "4MiB", "--optimizer", "sgd", "--json"]
    )
    payload = json.loads(capsys.readouterr().out)
    assert code == 0
    assert payload["batch_size"] >= 1
    assert 0 < payload["peak_bytes"] <= payload["target_bytes"] == int(4 * 2**20 * 0.9)
    assert payload["trials"] and {"batch_size", "fits", "peak_bytes", "seconds"} <= set(payload["trials"][0])
    assert any(trial["batch_size"] == payload["batch_size"] and trial["fits"] for trial in payload["trials"])


def test_cli_exit_1_when_nothing_fits(capsys):
    assert main(["batch-size", "--model", "builtin:mlp", "--input", "64", "--memory", "1KiB"]) == 1
    assert "not even batch size 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--model", "builtin:nope", "--input", "64", "--memory", "1GiB"], "builtin:nope"),
        (["--model", "builtin:mlp", "--input", "64xx", "--memory", "1GiB"], "64xx"),
        (["--model", "builtin:mlp", "--input", "64", "--memory", "lots"], "--memory"),
        (["--model", "builtin:mlp", "--input", "64", "--device", "cpu"], "--memory"),
        (["--model", "builtin:mlp", "--input", "64", "--device", "rtx3050-laptop-6gb"], "tightfit plan"),
        (["--model", "builtin:mlp", "--input", "64", "--memory", "1GiB", "--margin", "1"], "--margin"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(arguments, message, capsys):
    assert main(["batch-size", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error and "Traceback" not in error
