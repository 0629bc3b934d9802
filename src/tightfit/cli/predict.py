"""``tightfit predict``: run an exported model (ONNX or .pt2) on images, tensor files or text."""

HELP = "run an exported model (ONNX / .pt2) on images, tensor files or text, without the training code"
DESCRIPTION = """\
Run a model exported by `tightfit compress` (ONNX Runtime, or a torch.export .pt2 program) on new
inputs and print the top classes, with their names when the run had them. An image is prepared
as the training data was (size, channels, range, polarity: a black-on-white drawing of a digit is
inverted for the white-on-black digits model, cropped to its strokes), and an input still far from
the training images' statistics gets a warning.

examples:
  tightfit predict runs/digits/compressed/03-export/model.int8.onnx digit.png
  tightfit predict runs/digits/compressed samples.npy --top-k 3 --json     # best artifact of the report
  tightfit predict model.onnx --text "a sentence" "another one" --tokenizer path/to/tokenizer
"""


def add_arguments(parser) -> None:
    parser.add_argument("artifact", help="an .onnx or .pt2 file, or a compress output folder (its best artifact)")
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, .npy / .pt tensor files, or sentences with --text"
    )
    parser.add_argument("--text", action="store_true", help="the inputs are sentences for a text model")
    parser.add_argument(
        "--tokenizer", help="a local tokenizer folder for text models (default: from the model's metadata)"
    )
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per input (default 3)")
    parser.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    parser.add_argument(
        "--trust-pt2",
        action="store_true",
        help="load a .pt2 that this machine's compress did not write (loading one can run code inside it)",
    )


def run(args) -> int:
    import sys
    import warnings

    from tightfit.cli._output import console, print_json
    from tightfit.compression.predictor import load_artifact, predict

    artifact = load_artifact(args.artifact, threads=args.threads, trust_pt2=args.trust_pt2)
    with warnings.catch_warnings(record=True) as caught:  # inputs unlike the training data: said in one line each
        warnings.simplefilter("always", UserWarning)
        results = predict(artifact, args.inputs, top_k=args.top_k, text=args.text, tokenizer=args.tokenizer)
    notes = [str(warning.message) for warning in caught if issubclass(warning.category, UserWarning)]
    for note in notes:
        print(f"tightfit predict: warning: {note}", file=sys.stderr)
    if args.json:
        print_json(
            {"artifact": str(artifact.path), "runtime": artifact.kind, "predictions": results, "warnings": notes}
        )
        return 0
    screen = console()
    screen.print(f"{artifact.path} ({'ONNX Runtime' if artifact.kind == 'onnx' else 'torch.export program'})")
    for result in results:
        if "top" in result:
            classes = ", ".join(f"{entry['name']} {entry['probability']:.1%}" for entry in result["top"])
            screen.print(f"{result['input']}: {classes}")
        else:
            preview = ", ".join(f"{value:.4g}" for value in result["output"][:8])
            screen.print(
                f"{result['input']}: output {result['shape']} [{preview}{', ...' if len(result['output']) > 8 else ''}]"
            )
    return 0
