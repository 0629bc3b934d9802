"""``tightfit export-checkpoint``: one safetensors file from a run's sharded (FSDP) checkpoint."""

HELP = (
    "one safetensors file of a run's checkpoint (consolidated from FSDP/DCP shards, or the file an unsharded run has)"
)
DESCRIPTION = """\
A run trained with distributed.strategy=fsdp writes its checkpoints as shards, one set per rank
(torch.distributed.checkpoint). This reads them in one process and writes the whole model as one
safetensors file, for inference, `tightfit predict` and `tightfit compress`. An ordinary run's
checkpoint already is one file: its path is printed (or it is copied to --output).

examples:
  tightfit export-checkpoint runs/20260101-120000                 # best -> checkpoints/best/model.safetensors
  tightfit export-checkpoint runs/20260101-120000 --checkpoint last --output model.safetensors
"""


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.add_argument(
        "--checkpoint", default="best", help="best (default), last, or a top-k/NAME under RUN_DIR/checkpoints"
    )
    parser.add_argument(
        "--output", metavar="FILE", help="where to write (default: model.safetensors inside the checkpoint)"
    )
    parser.add_argument("--json", action="store_true", help="print {path, tensors, bytes} as JSON")


def _unsharded_weights(args):
    """An ordinary (unsharded) run's checkpoint is one safetensors file already: its path, or
    the copy at ``--output``; None for a sharded checkpoint (or none), which the export reads."""
    import shutil
    from pathlib import Path

    from tightfit.runs import checkpoint as checkpoint_files

    found = checkpoint_files.complete_checkpoint(Path(args.run_dir) / "checkpoints" / args.checkpoint)
    if found is None or checkpoint_files.is_sharded(found) or not (found / checkpoint_files.WEIGHTS_FILE).is_file():
        return None
    weights = found / checkpoint_files.WEIGHTS_FILE
    if not args.output:
        if not args.json:
            print(f"{args.run_dir}: not sharded; the {args.checkpoint} checkpoint is already one safetensors file")
        return weights
    output = Path(args.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(weights, output)
    return output


def run(args) -> int:
    from safetensors import safe_open

    from tightfit.runs.distributed_checkpoint import export_weights

    path = _unsharded_weights(args)
    verb = "wrote" if path is None or args.output else "its weights:"
    if path is None:
        path = export_weights(args.run_dir, args.checkpoint, args.output)
    with safe_open(str(path), framework="pt") as handle:
        tensors = len(list(handle.keys()))
    result = {"path": str(path), "tensors": tensors, "bytes": path.stat().st_size}
    if args.json:
        from tightfit.cli._output import print_json

        print_json(result)
    else:
        print(f"{verb} {path} ({tensors} tensors, {path.stat().st_size / 2**20:.1f} MiB)")
    return 0
