"""``tightfit lora``: inspect and merge the LoRA adapters of a training run."""

HELP = "inspect or merge the LoRA adapters of a run"
DESCRIPTION = """Inspect or merge the LoRA adapters a run wrote (RUN_DIR/adapters, safetensors).

  tightfit lora info RUN_DIR            rank, targets, trainable parameters, adapter size
  tightfit lora merge RUN_DIR           fold the adapters into the base weights -> RUN_DIR/merged
  tightfit lora merge RUN_DIR --output DIR --force

The base model is rebuilt from the run's config.yaml; a merged diffusion run is a complete
Stable Diffusion folder that diffusers loads without tightfit or PEFT."""


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    info = actions.add_parser("info", help="what the adapters of a run are")
    info.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its adapters/ folder)")
    info.add_argument("--json", action="store_true", help="print JSON")
    merge = actions.add_parser("merge", help="merge the adapters into the base weights")
    merge.add_argument("run_dir", metavar="RUN_DIR", help="a run directory trained with a lora: section")
    merge.add_argument("--output", metavar="DIR", help="where to write the merged model (default RUN_DIR/merged)")
    merge.add_argument("--force", action="store_true", help="replace files already in the output folder")
    merge.add_argument("--json", action="store_true", help="print JSON")
    merge.add_argument(
        "--trust-code",
        action="store_true",
        help="let the run's config.yaml name a module.path:callable model (runs its Python code)",
    )


def run(args) -> int:
    from tightfit.cli._output import console, print_json
    from tightfit.runs.model import describe_adapters, merge_run

    if args.action == "info":
        info = describe_adapters(args.run_dir)
        if args.json:
            print_json(info)
            return 0
        out = console()
        out.print(f"adapters        {info['adapters']}")
        out.print(f"base model      {info['base_model'] or '(unknown: no config.yaml beside the adapters)'}")
        out.print(
            f"rank / alpha    {info['rank']} / {info['alpha']:g}  (dropout {info['dropout']}, bias {info['bias']})"
        )
        out.print(f"targets         {info['target_modules']} modules ({', '.join(info['target_kinds'])})")
        if info["modules_to_save"]:
            out.print(f"trained in full {', '.join(info['modules_to_save'])}")
        if info["trainable_parameters"] is not None:
            share = 100 * info["trainable_parameters"] / max(info["total_parameters"], 1)
            out.print(
                f"parameters      {info['trainable_parameters']:,} trainable of {info['total_parameters']:,} "
                f"({share:.2f}%)"
            )
        if info["quantize_base"]:
            out.print(f"base            {info['quantize_base']} (quantized during training)")
        if info["adapter_bytes"] is not None:
            out.print(f"adapter file    {info['adapter_bytes'] / 2**20:.2f} MiB (adapter_model.safetensors)")
        return 0

    result = merge_run(args.run_dir, args.output, force=args.force, trust_code=args.trust_code)
    if args.json:
        print_json(result)
        return 0
    out = console()
    out.print(f"merged {result['parameters']:,} parameters ({result['kind']}) into {result['output']}")
    for name in result["files"]:
        out.print(f"  {name}")
    return 0
