"""Per-rank planning (tightfit.plan.distributed): the arithmetic, the devices-needed search, the CLI."""

import json

import pytest

from tightfit.errors import ConfigError
from tightfit.memory.report import StepMemory
from tightfit.plan.distributed import ModelShape, parse_devices, per_rank_memory, plan_distributed

GIB = 2**30


def test_devices_spec_parses_count_and_profile():
    assert parse_devices("4xa100-40gb") == (4, "a100-40gb")
    assert parse_devices("a100-40gb") == (None, "a100-40gb")
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices("0xa100-40gb")


def test_fsdp_shards_the_states_and_adds_units_in_flight_ddp_adds_a_bucket_or_its_buckets():
    single = StepMemory(
        peak_bytes=16 * GIB,
        breakdown={
            "parameters": 4 * GIB,
            "gradients": 4 * GIB,
            "optimizer": 8 * GIB,
            "optimizer_temporaries": 0,
            "activations": 0,
            "overhead": 0,
        },
    )
    shape = ModelShape(
        parameter_bytes=4 * GIB,
        trainable_bytes=4 * GIB,
        largest_block_parameters=10**6,
        root_parameters=2 * 10**6,
        parameter_count=GIB,
    )
    peak, parts, _ = per_rank_memory(
        single, shape, strategy="fsdp", devices=4, profile=None, param_dtype="bf16", reduce_dtype="fp32"
    )
    assert (parts["parameters"], parts["gradients"], parts["optimizer"]) == (GIB, GIB, 2 * GIB)
    assert parts["units_in_flight"] == (2 * 10**6 + 3 * 10**6) * 2  # root + three blocks, bf16
    assert parts["communication"] == 2 * 10**6 * 4  # two blocks' gradients, fp32
    assert peak == sum(parts.values())
    peak, parts, _ = per_rank_memory(single, shape, strategy="ddp", devices=4, profile=None)
    assert parts["communication"] == 25 * 2**20 and peak == 16 * GIB + 25 * 2**20
    # DistributedDataParallel: its buckets, as large as the gradients, beside the one-device step
    peak, parts, _ = per_rank_memory(single, shape, strategy="ddp", devices=4, profile=None, gradient_sync="overlap")
    assert parts["communication"] == 4 * GIB and peak == 20 * GIB == sum(parts.values())


def test_devices_needed_is_the_first_count_that_fits():
    # a 537M-parameter MLP, fp32 + AdamW: 8.6 GB of states does not fit one 6 GB laptop GPU
    result = plan_distributed(
        "builtin:mlp",
        "64",
        devices="rtx3050-laptop-6gb",
        strategy="fsdp",
        precision="fp32",
        checkpointing=False,
        model_kwargs={"hidden_sizes": [16384, 16384, 16384]},
    )
    assert result.devices_needed == result.rows[-1].devices > 1
    assert [row.fits for row in result.rows] == [False] * (len(result.rows) - 1) + [True]
    assert all(row.peak_bytes < earlier.peak_bytes for earlier, row in zip(result.rows, result.rows[1:]))
    ddp = plan_distributed(
        "builtin:mlp",
        "64",
        devices="2xrtx3050-laptop-6gb",
        strategy="ddp",
        precision="fp32",
        checkpointing=False,
        model_kwargs={"hidden_sizes": [16384, 16384, 16384]},
    )
    assert ddp.devices_needed is None and not ddp.rows[0].fits  # ddp replicates: more devices never help


def test_plan_cli_answers_per_rank_as_json(capsys):
    from tightfit.cli import main

    assert (
        main(
            [
                "plan",
                "--model",
                "builtin:digits-cnn",
                "--input",
                "1x8x8",
                "--batch-size",
                "8",
                "--devices",
                "2xa100-40gb",
                "--precision",
                "fp32",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["devices_asked"] == 2 and result["devices_needed"] == 2
    row = result["rows"][0]
    assert row["peak_bytes"] == sum(row["breakdown"].values()) and row["tokens_per_s"] > 0
    assert (
        main(
            [
                "plan",
                "--model",
                "builtin:digits-cnn",
                "--input",
                "1x8x8",
                "--batch-size",
                "8",
                "--devices",
                "2xa100-40gb",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    assert "devices needed: 2" in capsys.readouterr().out
    assert (
        main(
            ["plan", "--model", "builtin:digits-cnn", "--input", "1x8x8", "--devices", "2xa100-40gb", "--device", "cpu"]
        )
        == 2
    )


def test_a_pipeline_stage_plans_per_rank_with_devices(tmp_path):
    from tightfit.plan.pipeline import load_pipeline, plan_pipeline

    path = tmp_path / "pipeline.yaml"
    path.write_text(
        "device: rtx3050-laptop-6gb\n"
        "stages:\n"
        "  - {name: big-mlp, model: 'builtin:mlp', input: '64', precision: fp32, checkpointing: false,\n"
        "     model_kwargs: {hidden_sizes: [16384, 16384, 16384]}, devices: auto, strategy: fsdp, samples: 1000}\n"
    )
    stage = plan_pipeline(load_pipeline(path)).stages[0]
    needed = stage.plan["devices_needed"]
    assert stage.fits and needed > 1 and f"{needed} x rtx3050-laptop-6gb with fsdp" in stage.why
    assert stage.peak_bytes == stage.plan["rows"][-1]["peak_bytes"]
    assert stage.step_time_s is None  # a laptop GPU's profile has no interconnect figure: no time, not a guess
