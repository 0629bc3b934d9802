"""Two gloo processes on loopback under torchrun (docs/distributed.md).

DDP: sharded sampler, averaged gradients, reduced metrics, rank 0 writes; the result equals one
process reading both shards' samples per step, also when one rank runs out of memory; BatchNorm
statistics stay equal across ranks, through DistributedDataParallel and averaging after accumulation. FSDP2: a
SIGKILLed job resumes exactly from its sharded checkpoint, on 2 processes, on 1, and from 1 on 2.
The launcher (``tightfit train --nproc-per-node``) stops the job with a clear message when a rank dies.
Each torchrun launch costs a few seconds on two busy cores, so the tests launch few.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SOURCE = str(Path(__file__).resolve().parents[1] / "src")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from tightfit.training.trainer import Trainer

    run_dir, micro_batch_size = sys.argv[1], int(sys.argv[2])
    effective_batch_size = int(sys.argv[3]) if len(sys.argv) > 3 else None
    budget = sys.argv[4] if len(sys.argv) > 4 and os.environ.get("RANK") == "1" else None  # one rank short of memory
    lr = "auto" if os.environ.get("TEST_LR_AUTO") else 0.5
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 5, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] + inputs[:, 1] > 0).long())
    val = TensorDataset(inputs[:21], (inputs[:21, 0] > 0).long())  # odd size: no sample may count twice
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 2))
    config = {
        "run_dir": run_dir, "epochs": 2, "device": "cpu",
        "batch": {"micro_batch_size": micro_batch_size, "effective_batch_size": effective_batch_size}, "budget": budget,
        "optimizer": {"name": "sgd", "lr": lr}, "schedule": {"name": "constant"},
        "lr_find": {"num_steps": 12, "min_lr": 1e-3, "max_lr": 10.0},
        "logging": {"console": False, "tensorboard": False}, "monitor": {"enabled": False}, "threads": 1,
    }
    Trainer(config, model=model, datasets=(data, val, None)).fit()
    """
)


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": SOURCE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_environment(), **kwargs)


def test_two_ranks_match_one_process_with_the_combined_batch_also_when_one_rank_runs_out_of_memory(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    # rank 1 alone has a budget that micro-batches of 16 exceed (15.3 kB tracked) and of 8 fit (9.0 kB)
    distributed = _run([*TORCHRUN, str(script), str(tmp_path / "ddp"), "16", "16", "12000"])
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    single = _run([sys.executable, str(script), str(tmp_path / "single"), "32"])
    assert single.returncode == 0, single.stderr[-3000:]

    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    single_summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and ddp_summary["steps"] == single_summary["steps"] == 4
    # rank 0 (whose summary this is) had memory enough, yet shrank with rank 1; the effective batch stayed
    assert (
        ddp_summary["micro_batch_size"],
        ddp_summary["accumulation_steps"],
        ddp_summary["effective_batch_size"],
    ) == (8, 2, 16)
    assert ddp_summary["oom_recoveries"] == 1 and len(ddp_summary["peak_memory_bytes_per_rank"]) == 2
    assert ddp_summary["best_metric"]["value"] == pytest.approx(single_summary["best_metric"]["value"], rel=1e-5)
    expected = load_file(str(tmp_path / "single" / "checkpoints" / "last" / "model.safetensors"))
    actual = load_file(str(tmp_path / "ddp" / "checkpoints" / "last" / "model.safetensors"))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    validation_lines = [
        line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"val"' in line
    ]
    assert len(validation_lines) == 2  # rank 0 alone wrote the log


BATCH_NORM_SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from tightfit.training.trainer import Trainer

    run_dir, gradient_sync = sys.argv[1], sys.argv[2]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 5, generator=generator) * 3 + 1
    data = TensorDataset(inputs, (inputs[:, 0] + inputs[:, 1] > 2).long())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))

    class RecordStatistics:
        def __init__(self):
            self.steps = []

        def on_step_end(self, trainer, metrics):
            norm = trainer.model[1]
            stats = [norm.running_mean, norm.running_var, norm.num_batches_tracked.float().view(1)]
            self.steps.append(torch.cat(stats))

        def on_fit_end(self, trainer, summary):
            torch.save(torch.stack(self.steps), f"{run_dir}.rank{os.environ['RANK']}.pt")

    config = {
        "run_dir": run_dir, "epochs": 2, "device": "cpu", "threads": 1,
        "batch": {"micro_batch_size": 4, "effective_batch_size": 8}, "distributed": {"gradient_sync": gradient_sync},
        "optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": "constant"},
        "logging": {"console": False, "tensorboard": False}, "monitor": {"enabled": False},
    }
    Trainer(config, model=model, datasets=(data, None, None), callbacks=[RecordStatistics()]).fit()
    """
)


def test_ddp_keeps_batch_norm_statistics_equal_across_ranks_and_both_gradient_syncs_train_alike(tmp_path):
    script = tmp_path / "batch_norm.py"
    script.write_text(BATCH_NORM_SCRIPT)
    weights = {}
    for gradient_sync in ("overlap", "after_accumulation"):
        run_dir = tmp_path / gradient_sync
        done = _run([*TORCHRUN, str(script), str(run_dir), gradient_sync])
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((run_dir / "summary.json").read_text())["gradient_sync"] == gradient_sync
        rank0, rank1 = (torch.load(f"{run_dir}.rank{rank}.pt") for rank in (0, 1))
        assert rank0.shape[0] == 8  # 64 samples / (2 ranks x 8 per step) x 2 epochs
        assert torch.equal(rank0, rank1)  # every step, on every rank: each saw other samples
        assert rank0[-1, -1] == 16  # two micro-batches per step: two BatchNorm updates
        weights[gradient_sync] = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    # DistributedDataParallel (all-reduce during the last micro-batch's backward) and averaging
    # after the micro-batches are the same arithmetic
    for name, expected in weights["after_accumulation"].items():
        torch.testing.assert_close(weights["overlap"][name], expected, rtol=1e-5, atol=1e-6)


DIGITS = str(Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml")
# 200 samples per split: 2 steps per epoch on 2 ranks; AdamW, cosine schedule, BatchNorm buffers,
# and the two repeated conv blocks sharded as FSDP units with activation checkpointing composed
FSDP_RUN = [
    DIGITS,
    "distributed.strategy=fsdp",
    "checkpointing=auto",
    "checkpoint.every_n_steps=1",
    "logging.progress=false",
    "logging.tensorboard=false",
    "monitor.enabled=false",
    "data.limit=200",
]
KILLER = textwrap.dedent(
    """
    import os
    import signal
    from tightfit.models.builtin import DigitsCNN

    class DigitsCNNThatDies(DigitsCNN):
        training_forwards = 0

        def forward(self, images):
            if self.training and os.environ.get("KILL_RANK") == os.environ.get("RANK"):
                DigitsCNNThatDies.training_forwards += 1
                if DigitsCNNThatDies.training_forwards == int(os.environ["KILL_AT_FORWARD"]):
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().forward(images)

    def build(num_classes=10):
        return DigitsCNNThatDies(num_classes=num_classes)
    """
)


def _weights(run_dir: Path) -> dict:
    from tightfit.runs.distributed_checkpoint import read_sharded_weights

    return read_sharded_weights(run_dir / "checkpoints" / "last")


def _assert_same(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_fsdp_killed_rank_stops_the_job_and_resumes_exactly_on_two_processes_one_and_back(tmp_path, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp_path))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _run([*TORCHRUN, "-m", "tightfit", "train", *FSDP_RUN, "max_steps=6", "--run-dir", str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]

    # rank 1 dies (SIGKILL) in step 4's forward: the launcher stops rank 0 and says what happened
    monkeypatch.setenv("KILL_RANK", "1")
    monkeypatch.setenv("KILL_AT_FORWARD", "4")
    launch = [
        sys.executable,
        "-m",
        "tightfit",
        "train",
        *FSDP_RUN,
        "model=killer:build",
        "max_steps=6",
        "--run-dir",
        str(killed),
        "--trust-code",
    ]
    failed = _run([*launch, "--nproc-per-node", "2"])
    assert failed.returncode == 1
    assert (
        "tightfit train: error: rank 1 failed first (killed by SIGKILL)" in failed.stderr
        and "--resume" in failed.stderr
    )
    # checkpoint.every_n_steps=1: the periodic checkpoint of step 3 is the newest complete one
    assert json.loads((killed / "checkpoints" / "step-3" / "meta.json").read_text())["step"] == 3
    assert not (killed / "checkpoints" / "step-4").exists()
    monkeypatch.delenv("KILL_RANK")
    one_process = tmp_path / "one-process"
    shutil.copytree(killed, one_process)

    resumed = _run([*TORCHRUN, "-m", "tightfit", "train", "--resume", str(killed), "--trust-code"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same(_weights(killed), _weights(straight))  # exact: bit for bit

    # 2 -> 1: one process loads both ranks' shards: weights and optimizer state whole
    from tightfit.config import load_config
    from tightfit.runs.distributed_checkpoint import read_sharded_weights
    from tightfit.training.trainer import Trainer

    newest = one_process / "checkpoints" / "step-3"  # what a resume continues from
    saved_optimizer = read_sharded_weights(newest, part="optimizer")
    trainer = Trainer(load_config(one_process / "config.yaml", trust_code=True))
    trainer.setup(resume_from=one_process)
    assert trainer.global_step == 3 and trainer.process.world_size == 1
    _assert_same(
        {name: tensor.detach() for name, tensor in trainer.model.state_dict().items()}, read_sharded_weights(newest)
    )
    names = dict((parameter, name) for name, parameter in trainer.model.named_parameters())
    for parameter, state in trainer.optimizer.state.items():
        assert torch.equal(state["exp_avg"], saved_optimizer[f"state.{names[parameter]}.exp_avg"])
    summary = trainer.fit()
    assert summary["steps"] == 6 and summary["world_size"] == 1

    # 1 -> 2: two ranks load the one-process checkpoint and write it back sharded, unchanged
    before = _weights(one_process)
    back = _run([*TORCHRUN, "-m", "tightfit", "train", "--resume", str(one_process), "--trust-code"])
    assert back.returncode == 0, back.stderr[-3000:]
    _assert_same(_weights(one_process), before)

    from tightfit.cli import main

    assert (
        main(
            [
                "export-checkpoint",
                str(straight),
                "--checkpoint",
                "last",
                "--output",
                str(tmp_path / "model.safetensors"),
            ]
        )
        == 0
    )
    _assert_same(load_file(str(tmp_path / "model.safetensors")), _weights(straight))


def test_distributed_settings_are_checked_by_name():
    from tightfit.config import build_config

    with pytest.raises(Exception, match=r"distributed\.strategy"):
        build_config({"distributed": {"strategy": "zero3"}})
    from tightfit.training.distributed import check_strategy

    with pytest.raises(Exception, match=r"distributed\.cpu_offload"):
        check_strategy("fsdp", device_type="cpu", cpu_offload=True, precision="fp32")


LORA_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from tightfit.training.trainer import Trainer

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 16, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] > 0).long())
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(3)]
    model = nn.Sequential(nn.Linear(16, 32), *blocks, nn.Linear(32, 2))
    config = {
        "run_dir": sys.argv[1], "max_steps": 2, "device": "cpu", "batch": {"micro_batch_size": 8}, "threads": 1,
        "distributed": {"strategy": "fsdp"}, "checkpointing": "auto",
        "lora": {"rank": 4, "target_modules": ["1.0", "2.0", "3.0"], "modules_to_save": ["4"]},
        "logging": {"console": False, "tensorboard": False}, "monitor": {"enabled": False},
    }
    Trainer(config, model=model, datasets=(data, data, None)).fit()
    """
)


def test_lora_under_fsdp_trains_and_checkpoints_only_the_adapters(tmp_path):
    script = tmp_path / "lora.py"
    script.write_text(LORA_SCRIPT)
    done = _run([*TORCHRUN, str(script), str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr[-3000:]
    shards = _weights(tmp_path / "run")
    assert shards and all(".lora_" in name or ".modules_to_save." in name for name in shards)
    adapters = load_file(str(tmp_path / "run" / "adapters" / "adapter_model.safetensors"))
    lora_b = shards["base_model.model.1.0.lora_B.default.weight"]
    assert lora_b.abs().sum() > 0  # B starts at zero: it trained
    assert torch.equal(adapters["base_model.model.1.0.lora_B.weight"], lora_b)  # gathered whole from both ranks


def test_fsdp_gathers_in_the_run_precision_except_beside_batch_norm_under_autocast():
    from torch import nn

    from tightfit.plan.distributed import fsdp_param_dtype

    plain, normed = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert fsdp_param_dtype("auto", "bf16", plain) == "bf16" and fsdp_param_dtype("auto", "fp32", plain) == "fp32"
    assert fsdp_param_dtype("auto", "bf16", normed) == "fp32"  # its fp32 running statistics refuse bf16 weights
    assert (
        fsdp_param_dtype("auto", "bf16-pure", normed) == "bf16" and fsdp_param_dtype("fp16", "bf16", normed) == "fp16"
    )


def test_lr_auto_under_two_processes_picks_the_rate_one_process_with_the_combined_batch_picks(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    environment = {**_environment(), "TEST_LR_AUTO": "1"}
    distributed = subprocess.run(
        [*TORCHRUN, str(script), str(tmp_path / "ddp"), "8"],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single"), "16"],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    single_summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert ddp_summary["lr_find"]["suggestion"] is not None
    assert ddp_summary["lr"] == single_summary["lr"] == ddp_summary["lr_find"]["suggestion"]
    assert ddp_summary["best_metric"]["value"] == pytest.approx(single_summary["best_metric"]["value"], rel=1e-5)
