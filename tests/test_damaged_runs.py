"""Damaged runs and disks (issue 9, items 4-7): a damaged ``last`` resumes from the newest intact
checkpoint and says which file was damaged; a kill before the first checkpoint is not a dead end;
a full disk is one line with the previous checkpoint intact; a user's folder is never overwritten."""

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tightfit.cli import main
from tightfit.errors import ConfigError
from tightfit.runs import checkpoint as checkpoint_files
from tightfit.runs.run_folder import RUN_MARKER

QUICK = [
    "epochs=2",
    "--limit",
    "100",
    "batch.micro_batch_size=32",
    "logging.tensorboard=false",
    "logging.console=false",
    "logging.jsonl=false",
    "monitor.enabled=false",
    "checkpoint.keep_top_k=2",
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A two-epoch digits run with last, best and two top-k checkpoints, written with a relative --run-dir."""
    root = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "--run-dir", "run", *QUICK, "--json"]) == 0
    finally:
        os.chdir(cwd)
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def newest_weights_only(run_dir: Path) -> Path:
    folders = [
        folder for folder in checkpoint_files.checkpoint_folders(run_dir / "checkpoints") if folder.name != "last"
    ]
    return folders[0]


def test_summary_paths_are_absolute_and_compress_finds_the_weights_from_anywhere(finished_run, tmp_path, monkeypatch):
    summary = json.loads((finished_run / "summary.json").read_text())
    for key in ("run_dir", "best_checkpoint", "last_checkpoint"):
        assert Path(summary[key]).is_absolute() and Path(summary[key]).exists(), key
    from tightfit.compression.pipeline import load_source

    monkeypatch.chdir(tmp_path)
    source = load_source(str(finished_run))
    best = load_file(str(finished_run / "checkpoints" / "best" / "model.safetensors"))
    assert all(torch.equal(source.model.state_dict()[name], tensor) for name, tensor in best.items())
    assert source.notes == []


@pytest.mark.parametrize("damage", ["truncated weights", "truncated state", "malicious state"])
def test_a_damaged_last_resumes_from_the_newest_intact_checkpoint(run_copy, damage, capsys, tmp_path):
    last = run_copy / "checkpoints" / "last"
    marker = tmp_path / "PWNED"
    if damage == "truncated weights":
        truncate(last / "model.safetensors")
        damaged, reason = "model.safetensors", "is damaged"
    elif damage == "truncated state":
        truncate(last / "state.pt")
        damaged, reason = "state.pt", "is damaged"
    else:

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"counters": Payload()}, last / "state.pt")
        damaged, reason = "state.pt", "holds Python objects a safe load refuses"
    fallback = newest_weights_only(run_copy)
    assert main(["train", "--resume", str(run_copy), "epochs=3", "--json"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert f"skipped a damaged checkpoint: {last / damaged} {reason}" in captured.err
    assert f"resumed from {fallback} (weights only)" in captured.err
    summary = json.loads(captured.out)
    assert summary["epochs"] == 3 and summary["steps"] == 12  # 4 steps an epoch: continued from step 8
    assert not marker.exists()


def test_a_moved_aside_last_is_preferred_to_weights_only_checkpoints(run_copy, capsys):
    checkpoints = run_copy / "checkpoints"
    os.replace(checkpoints / "last", checkpoints / "last.old")  # a kill between the two renames
    assert main(["train", "--resume", str(run_copy), "epochs=3", "--json"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err  # exact resume: nothing to warn about
    assert json.loads(captured.out)["steps"] == 12


def test_when_every_checkpoint_is_damaged_each_file_is_named_on_one_line(run_copy, capsys):
    for folder in checkpoint_files.checkpoint_folders(run_copy / "checkpoints"):
        truncate(folder / "model.safetensors")
    before = snapshot(run_copy)
    code = main(["train", "--resume", str(run_copy)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no intact checkpoint" in err and err.count("model.safetensors is damaged") == 4
    assert snapshot(run_copy) == before


def test_compress_falls_back_from_a_damaged_best(run_copy):
    from tightfit.compression.pipeline import load_source

    truncate(run_copy / "checkpoints" / "best" / "model.safetensors")
    source = load_source(str(run_copy))
    fallback = checkpoint_files.checkpoint_folders(run_copy / "checkpoints")[0]  # last: the newest
    expected = load_file(str(fallback / "model.safetensors"))
    assert all(torch.equal(source.model.state_dict()[name], tensor) for name, tensor in expected.items())
    assert "best/model.safetensors is damaged" in source.notes[0]
    assert str(fallback) in source.notes[-1]


def test_a_kill_during_the_first_checkpoint_write_is_not_a_dead_end(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # what a SIGKILL during the very first write leaves: the run's files and a half-written temporary
    (run_dir / "checkpoints" / ".best.tmp-k1ll3d").mkdir(parents=True)
    (run_dir / "checkpoints" / ".best.tmp-k1ll3d" / "model.safetensors").write_bytes(b"\0" * 10)
    (run_dir / "checkpoints" / "top-k" / ".step-0000004.tmp-x").mkdir(parents=True)
    (run_dir / RUN_MARKER).touch()
    (run_dir / "config.yaml").write_text("epochs: 1\n")
    code = main(["train", "--resume", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no complete checkpoint" in err and "without --resume, with the same --run-dir" in err
    # the advice works: a fresh start in the same folder runs and sweeps the stale temporaries
    assert main(["train", "--run-dir", str(run_dir), *QUICK, "epochs=1"]) == 0
    assert not list((run_dir / "checkpoints").rglob("*.tmp-*"))
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").is_file()


def test_a_finished_run_is_not_restarted_over(finished_run, capsys):
    before = snapshot(finished_run)
    code = main(["train", "--run-dir", str(finished_run), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run; continue it with --resume" in err
    assert snapshot(finished_run) == before


def test_a_users_own_folder_is_never_overwritten(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: notes\n")
    (folder / "summary.json").write_text('{"mine": true}')
    before = snapshot(folder)
    code = main(["train", "--run-dir", str(folder), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "is not empty and is not a tightfit run" in err and "config.yaml" in err
    assert snapshot(folder) == before


def test_a_plain_file_or_unwritable_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    code = main(["train", "--run-dir", str(plain), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert plain.read_text() == "keep me"
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == read_only else real_access(path, mode))
    code = main(["train", "--run-dir", str(read_only / "run"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be written" in err and not (read_only / "run").exists()


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints" / "last"
    model = torch.nn.Linear(8, 4)
    checkpoint_files.save_checkpoint(
        directory, checkpoint_files.model_weights(model), {"counters": {"global_step": 1}}, {"step": 1}
    )
    before = snapshot(directory)

    def full_disk(state, path):  # what torch's zip writer raises when the disk fills mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4344")

    monkeypatch.setattr(checkpoint_files.torch, "save", full_disk)
    with pytest.raises(
        checkpoint_files.DiskFullError,
        match=r"disk full at .*checkpoint last needs about .* MiB, .* free; the previous checkpoint is intact",
    ) as error:
        checkpoint_files.save_checkpoint(
            directory, checkpoint_files.model_weights(model), {"counters": {"global_step": 2}}, {"step": 2}
        )
    assert "\n" not in str(error.value)
    assert snapshot(directory) == before
    assert [path.name for path in directory.parent.iterdir()] == ["last"]  # no temporary left


def test_a_real_full_tmpfs(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, check=False
    ).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        directory = mount_point / "last"
        small = torch.nn.Linear(16, 16)
        checkpoint_files.save_checkpoint(
            directory, checkpoint_files.model_weights(small), {"counters": {"global_step": 1}}, {"step": 1}
        )
        before = snapshot(directory)
        big = torch.nn.Linear(1024, 512)  # 2 MiB of weights on a 1 MiB disk
        with pytest.raises(checkpoint_files.DiskFullError, match="disk full at"):
            checkpoint_files.save_checkpoint(
                directory, checkpoint_files.model_weights(big), {"counters": {"global_step": 2}}, {"step": 2}
            )
        assert snapshot(directory) == before
        assert [path.name for path in mount_point.iterdir()] == ["last"]
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_load_checkpoint_names_a_tampered_state_file(tmp_path):
    directory = tmp_path / "last"
    checkpoint_files.save_checkpoint(
        directory, checkpoint_files.model_weights(torch.nn.Linear(2, 2)), {"counters": {}}, {"step": 1}
    )
    buffer = io.BytesIO()
    torch.save({"counters": {}, "extra": Path("x")}, buffer)  # an object a weights-only load refuses
    (directory / "state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(checkpoint_files.DamagedCheckpointError, match="state.pt holds Python objects"):
        checkpoint_files.load_checkpoint(directory, torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="do not fit the model"):
        checkpoint_files.save_checkpoint(
            directory, checkpoint_files.model_weights(torch.nn.Linear(2, 2)), {"counters": {}}, {"step": 1}
        )
        checkpoint_files.load_checkpoint(directory, torch.nn.Linear(3, 2))


def test_resuming_a_copied_run_never_touches_the_original(finished_run, tmp_path, capsys):
    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(finished_run, original)
    shutil.copytree(original, copy)
    for run in (original, copy):  # what a kill between a top-k write and the next 'last' leaves
        (run / "checkpoints" / "top-k" / "step-9999999-stray").mkdir()
    before, first = snapshot(original), snapshot(finished_run)  # the saved state names finished_run's folder
    assert main(["train", "--resume", str(copy), "epochs=3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert snapshot(original) == before and snapshot(finished_run) == first
    assert not (copy / "checkpoints" / "top-k" / "step-9999999-stray").exists()  # pruned where it belongs
    assert summary["best_checkpoint"] == str(copy / "checkpoints" / "best")
