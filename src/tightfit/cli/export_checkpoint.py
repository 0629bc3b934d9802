"""``tightfit export-checkpoint``: one safetensors file from a run's sharded (FSDP) checkpoint."""

HELP = "consolidate a run's sharded (FSDP/DCP) checkpoint into one safetensors file"
DESCRIPTION = """\
A run trained with distributed.strategy=fsdp writes its checkpoints as shards, one set per rank
(torch.distributed.checkpoint). This reads them in one process and writes the whole model as one
safetensors file, for inference, `tightfit predict` and `tightfit compress`.

examples:
  tightfit export-checkpoint runs/20260101-120000                 # best -> checkpoints/best/model.safetensors
  tightfit export-checkpoint runs/20260101-120000 --checkpoint last --output model.safetensors
"""


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a top-k/NAME under RUN_DIR/checkpoints")
    parser.add_argument("--output", metavar="FILE", help="where to write (default: model.safetensors inside the checkpoint)")
    parser.add_argument("--json", action="store_true", help="print {path, tensors, bytes} as JSON")


def run(args) -> int:
    from safetensors import safe_open

    from tightfit.runs.distributed_checkpoint import export_weights

    path = export_weights(args.run_dir, args.checkpoint, args.output)
    with safe_open(str(path), framework="pt") as handle:
        tensors = len(list(handle.keys()))
    result = {"path": str(path), "tensors": tensors, "bytes": path.stat().st_size}
    if args.json:
        from tightfit.cli._output import print_json

        print_json(result)
    else:
        print(f"wrote {path} ({tensors} tensors, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0
