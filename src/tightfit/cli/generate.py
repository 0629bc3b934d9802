"""``tightfit generate``: text from a language-model run or folder, images from a diffusion one."""

HELP = "generate text (causal LM) or images (diffusion) from a run directory or a model folder"
DESCRIPTION = """\
Try what a run learnt. A language model (a run trained on a text-corpus, or a transformers
folder) answers --prompt token by token, streamed to the terminal, with a KV cache; a LoRA run
has its adapters merged into the base first. A diffusion model (a run on diffusion:DIR, or a
diffusers folder) draws the prompt into PNG files, the run's LoRA applied.

examples:
  tightfit generate runs/pirate --prompt "What colour is grass?"                 # greedy
  tightfit generate runs/pirate --prompt "What colour is grass?" --temperature 0.8 --top-p 0.9 --seed 3
  tightfit generate path/to/llama-folder --prompt "Once upon a time" --max-new-tokens 50 --json
  tightfit generate runs/sd-lora --prompt "a red sneaker" --steps 25 --guidance 7.5 --output images/
"""


def add_arguments(parser) -> None:
    parser.add_argument(
        "path", metavar="RUN_DIR|MODEL_DIR", help="a tightfit run, a transformers folder or a diffusers folder"
    )
    parser.add_argument("--prompt", required=True, help="the text to answer, continue or draw")
    text = parser.add_argument_group("text (causal language models)")
    text.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="the most tokens to add (default 64)")
    text.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sample")
    text.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the tokens making up this probability (default 1.0)",
    )
    text.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence each token instead of using the KV cache"
    )
    text.add_argument(
        "--raw", action="store_true", help="give the prompt as plain text, without the run's conversation template"
    )
    images = parser.add_argument_group("images (diffusion models)")
    images.add_argument("--steps", type=int, default=25, help="DDIM denoising steps (default 25)")
    images.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    images.add_argument("--num-images", type=int, default=1, metavar="N", help="images to draw, seeds SEED..SEED+N-1")
    images.add_argument("--resolution", type=int, metavar="PX", help="image side (default: the UNet's)")
    images.add_argument("--output", default="generated", metavar="DIR", help="where the PNGs go (default ./generated)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")
    parser.add_argument(
        "--device", default="auto", help="auto (default: CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps"
    )
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="let the run's config.yaml name a module.path:callable model (runs its code)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")


def run(args) -> int:
    import sys

    from tightfit.cli._output import print_json
    from tightfit.hardware.detect import resolve_device
    from tightfit.models.generate import generate_images, generate_text
    from tightfit.runs.model import load_for_generation

    device = resolve_device(args.device)  # the best device of this machine unless told
    loaded = load_for_generation(args.path, device=str(device), trust_code=args.trust_code)
    if loaded.kind == "diffusion":
        paths = generate_images(
            loaded,
            args.prompt,
            args.output,
            num_images=args.num_images,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            resolution=args.resolution,
        )
        if args.json:
            print_json(
                {
                    "prompt": args.prompt,
                    "images": [str(path) for path in paths],
                    "steps": args.steps,
                    "guidance": args.guidance,
                    "seed": args.seed,
                }
            )
        else:
            for path in paths:
                print(path)
        return 0

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate_text(
        loaded,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
        raw=args.raw,
        on_text=None if args.json else stream,
    )
    if args.json:
        print_json(result.to_dict())
    else:
        sys.stdout.write("\n")
        print(
            f"[{result.new_tokens} tokens, {result.tokens_per_s:.1f} tokens/s, stopped: {result.stopped}]",
            file=sys.stderr,
        )
    return 0
