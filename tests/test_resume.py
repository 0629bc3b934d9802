"""Exact resume: a run killed with SIGKILL mid-epoch and resumed ends with the same weights as an
uninterrupted run; checkpoints survive a crash mid-write and load without unpickling code."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tightfit.runs import checkpoint as checkpoint_files
from tightfit.step.rng import rng_state, set_rng_state

# The run: dropout (RNG), AdamW (optimizer state), cosine with warm-up (schedule), shuffled data
# (sampler position), 3 epochs of 8 steps, a resumable checkpoint every 3 steps. A callback slows
# each step so the parent can kill the process mid-epoch after a checkpoint landed.
RUN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from tightfit.training.trainer import Trainer

    run_dir, mode, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 6, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] > 0).long())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    config = {
        "run_dir": run_dir, "epochs": 3, "seed": 7,
        "batch": {"micro_batch_size": 4, "effective_batch_size": 8},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "checkpoint": {"every_n_steps": 3},
        "logging": {"console": False, "tensorboard": False},
        "monitor": {"enabled": False}, "threads": 1,
    }

    class SlowDown:
        def on_step_end(self, trainer, metrics):
            time.sleep(delay)

    trainer = Trainer(config, model=model, datasets=(data, data, None), callbacks=[SlowDown()])
    trainer.fit(resume_from=run_dir if mode == "resume" else None)
    """
)


def run_script(tmp_path: Path, run_dir: Path, mode: str, delay: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), str(run_dir), mode, str(delay)], stderr=subprocess.PIPE, text=True
    )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    interrupted = tmp_path / "interrupted"
    reference = run_script(tmp_path, uninterrupted, "fresh")
    victim = run_script(tmp_path, interrupted, "fresh", delay=0.25)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # step-12 is the periodic checkpoint half-way through the second epoch (8 steps an epoch)
        if checkpoint_files.complete_checkpoint(interrupted / "checkpoints" / "step-12") is not None:
            break
        time.sleep(0.05)
    else:
        victim.kill()
        pytest.fail("the interrupted run wrote no mid-epoch checkpoint in time")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (interrupted / "summary.json").exists()
    resume_point = checkpoint_files.checkpoint_folders(interrupted / "checkpoints")[0]  # what --resume takes
    killed_at = json.loads((resume_point / checkpoint_files.META_FILE).read_text())["step"]
    assert resume_point.name.startswith("step-") and 12 <= killed_at < 24  # mid-epoch, not "last"

    resumed = run_script(tmp_path, interrupted, "resume")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert reference.wait(timeout=120) == 0, reference.stderr.read()

    expected, actual = final_weights(uninterrupted), final_weights(interrupted)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["samples_seen"] == 3 * 64
    assert summary["best_metric"] == json.loads((uninterrupted / "summary.json").read_text())["best_metric"]


def test_checkpoint_survives_a_crash_between_the_two_renames(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    directory = tmp_path / "last"
    checkpoint_files.save_checkpoint(
        directory, checkpoint_files.model_weights(model), {"counters": {"global_step": 1}}, {"step": 1}
    )
    first_weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    real_replace = os.replace
    calls = []

    def crash_on_second_replace(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between moving the old checkpoint aside and moving the new one in")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint_files.os, "replace", crash_on_second_replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_files.save_checkpoint(
            directory, checkpoint_files.model_weights(model), {"counters": {"global_step": 2}}, {"step": 2}
        )
    monkeypatch.undo()
    assert not directory.exists()  # the crash left only the moved-aside copy ...
    restored = torch.nn.Linear(3, 2)
    state, meta = checkpoint_files.load_checkpoint(directory, restored)  # ... which load falls back to
    assert meta["step"] == 1 and state["counters"]["global_step"] == 1
    torch.testing.assert_close(restored.weight, first_weights["weight"])
    assert not any(path.name.startswith(".last.tmp-") for path in tmp_path.iterdir())  # no half-written temp left


def test_checkpoint_state_loads_with_weights_only_and_rng_round_trips(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    torch.manual_seed(123)
    state = {"optimizer": optimizer.state_dict(), "rng": rng_state()}
    expected_draw = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    checkpoint_files.save_checkpoint(tmp_path / "ckpt", checkpoint_files.model_weights(model), state, {"step": 1})
    loaded = torch.load(tmp_path / "ckpt" / checkpoint_files.STATE_FILE, weights_only=True)  # no pickled code
    set_rng_state(loaded["rng"])
    actual_draw = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(actual_draw[0], expected_draw[0]) and actual_draw[1:] == expected_draw[1:]
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 2).parameters())
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == 1


def test_resume_of_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    from tightfit.cli import main

    assert main(["train", "--resume", str(tmp_path)]) == 2
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    from tightfit.errors import ConfigError

    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoint_files.load_checkpoint(tmp_path / "checkpoints" / "last", torch.nn.Linear(1, 1))


# The run above, with a hook on checkpoint writes: the moment a `best` is complete on disk while an
# older `last` is the newest full-state checkpoint (validation writes best, then the epoch's end
# writes last), the process is SIGKILLed. No periodic checkpoints, so last and best are the pair.
KILL_HOOK = textwrap.dedent(
    """
    import os, signal
    from pathlib import Path

    original_save = Trainer.save_checkpoint

    def save_then_maybe_die(self, name, *args, **kwargs):
        path = original_save(self, name, *args, **kwargs)
        if mode == "kill" and name == "best" and (Path(run_dir) / "checkpoints" / "last").is_dir():
            self.checkpoint_writer.wait()  # best is whole on disk; this epoch's last is not written yet
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    Trainer.save_checkpoint = save_then_maybe_die
    """
)
KILL_BETWEEN_BEST_AND_LAST = RUN_SCRIPT.replace('"checkpoint": {"every_n_steps": 3},', "").replace(
    "trainer = Trainer(", KILL_HOOK + "trainer = Trainer(", 1
)


def test_a_kill_between_best_and_last_of_one_epoch_resumes_exactly(tmp_path):
    """Resume takes the newest checkpoint with the whole training state (the older last), not the
    newer weights-only best; from a weights-only one only when no full-state one is intact."""
    script = tmp_path / "between.py"
    script.write_text(KILL_BETWEEN_BEST_AND_LAST)
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"

    def launch(run_dir: Path, mode: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(script), str(run_dir), mode, "0"], stderr=subprocess.PIPE, text=True
        )

    reference, victim = launch(uninterrupted, "fresh"), launch(killed, "kill")
    assert victim.wait(timeout=120) == -signal.SIGKILL, victim.stderr.read()
    checkpoints = killed / "checkpoints"
    step = {
        name: json.loads((checkpoints / name / checkpoint_files.META_FILE).read_text())["step"]
        for name in ("last", "best")
    }
    assert step["last"] < step["best"]  # the window: best of the epoch written, its last not yet
    # the same folder with last damaged: weights only from best, with a warning that says why
    damaged = tmp_path / "damaged"
    shutil.copytree(killed, damaged)
    (damaged / "checkpoints" / "last" / checkpoint_files.STATE_FILE).write_bytes(b"damaged")
    resumed, fallback = launch(killed, "resume"), launch(damaged, "resume")
    _, warnings = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, warnings
    assert "weights only" not in warnings and "warning" not in warnings
    _, fallback_warnings = fallback.communicate(timeout=120)
    assert fallback.returncode == 0, fallback_warnings
    assert "best (weights only)" in fallback_warnings
    assert "no intact checkpoint holds the whole training state (last damaged" in fallback_warnings
    assert reference.wait(timeout=120) == 0, reference.stderr.read()

    expected, actual = final_weights(uninterrupted), final_weights(killed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name  # bit for bit
    expected_state, actual_state = (
        torch.load(run / "checkpoints" / "last" / checkpoint_files.STATE_FILE, weights_only=True)
        for run in (uninterrupted, killed)
    )
    for index, moments in expected_state["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(actual_state["optimizer"]["state"][index][key], value), (index, key)
    expected_summary, actual_summary = (
        json.loads((run / "summary.json").read_text()) for run in (uninterrupted, killed)
    )
    for key in ("steps", "samples_seen", "best_metric", "final_metrics"):
        if key in expected_summary:
            assert actual_summary[key] == expected_summary[key], key
    assert (
        json.loads((checkpoints / "last" / "meta.json").read_text())["metrics"]
        == json.loads((uninterrupted / "checkpoints" / "last" / "meta.json").read_text())["metrics"]
    )


def test_checkpoint_writer_close_finishes_the_queue_joins_its_thread_and_reraises(tmp_path):
    from tightfit.runs.checkpoint_writer import CheckpointWriter

    writer = CheckpointWriter()
    (tmp_path / "old").mkdir()
    writer.remove(tmp_path / "old")
    thread = writer._thread
    writer.close()
    assert not (tmp_path / "old").exists() and not thread.is_alive()  # no writer thread outlives fit()
    writer._submit(lambda: 1 / 0)  # a closed writer starts a new thread; a failed write is re-raised
    with pytest.raises(ZeroDivisionError):
        writer.close()
    assert writer._thread is None
