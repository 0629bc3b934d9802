"""Two gloo processes on loopback under torchrun: DDP wrap, sharded sampler, reduced metrics,
rank 0 writes. Their result equals one process reading both shards' samples per step."""

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from tightfit.training.trainer import Trainer

    run_dir, micro_batch_size = sys.argv[1], int(sys.argv[2])
    lr = sys.argv[3] if len(sys.argv) > 3 else 0.5
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 5, generator=generator)
    data = TensorDataset(inputs, (inputs[:, 0] + inputs[:, 1] > 0).long())
    val = TensorDataset(inputs[:21], (inputs[:21, 0] > 0).long())  # odd size: no sample may count twice
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    config = {
        "run_dir": run_dir, "epochs": 2, "device": "cpu",
        "batch": {"micro_batch_size": micro_batch_size},
        "optimizer": {"name": "sgd", "lr": lr}, "schedule": {"name": "constant"},
        "lr_find": {"num_steps": 12, "min_lr": 1e-3, "max_lr": 10.0},
        "logging": {"console": False, "tensorboard": False}, "monitor": {"enabled": False}, "threads": 1,
    }
    Trainer(config, model=model, datasets=(data, val, None)).fit()
    """
)


def test_two_gloo_processes_match_one_process_with_the_combined_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    distributed = subprocess.run([*launch, str(tmp_path / "ddp"), "8"], capture_output=True, text=True, timeout=300)
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "16"], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    single_summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and ddp_summary["steps"] == single_summary["steps"] == 8
    assert ddp_summary["best_metric"]["value"] == __import__("pytest").approx(single_summary["best_metric"]["value"], rel=1e-5)
    expected = load_file(str(tmp_path / "single" / "checkpoints" / "last" / "model.safetensors"))
    actual = load_file(str(tmp_path / "ddp" / "checkpoints" / "last" / "model.safetensors"))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6)
    validation_lines = [line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert len(validation_lines) == 2  # rank 0 alone wrote the log


def test_lr_auto_under_two_processes_picks_the_rate_one_process_with_the_combined_batch_picks(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    distributed = subprocess.run([*launch, str(tmp_path / "ddp"), "8", "auto"], capture_output=True, text=True, timeout=300)
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "16", "auto"], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    single_summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert ddp_summary["lr_find"]["suggestion"] is not None
    assert ddp_summary["lr"] == single_summary["lr"] == ddp_summary["lr_find"]["suggestion"]
    assert ddp_summary["best_metric"]["value"] == __import__("pytest").approx(single_summary["best_metric"]["value"], rel=1e-5)
