"""``tightfit run``: run a research study from one YAML file."""

HELP = "run a study: pre-train, train, extract features, classify, compare arms statistically (MLflow-tracked)"
DESCRIPTION = """\
Run the stages of a STUDY.yaml in graph order: self-supervised pre-training (MIM, contrastive) and
supervised training through the trainer, feature extraction (forward-only, a shard per batch),
sparse coding, classifiers on the CPU (SVM with nested CV, SRC, logistic regression, kNN) over
folds every arm shares, and the statistics between arms. Ends with STUDY_FOLDER/results.md,
results.json and report.html (tightfit report); MLflow records a parent run and a nested run per
stage (STUDY_FOLDER/mlruns).

The file is checked before anything runs (unknown stages, a 'from' of the wrong kind, cycles,
missing data): one line naming the stage and key, exit 2, nothing written. Stages whose settings
and inputs did not change since they completed are skipped.

examples:
  tightfit run examples/pipelines/digits-study.yaml
  tightfit run examples/pipelines/digits-study.yaml --dry-run
  tightfit run examples/pipelines/digits-study.yaml --resume          # after a crash or Ctrl-C
  tightfit run examples/pipelines/digits-study.yaml --only classify --json
"""


def add_arguments(parser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", help="the study file (see docs/study.md)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted stages (trainer checkpoints, extracted shards) instead of restarting them",
    )
    parser.add_argument(
        "--only",
        metavar="STAGE",
        help="run only this stage, if its inputs changed (the stages it reads must be complete)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the file and print the plan (tightfit plan STUDY.yaml); run nothing",
    )
    parser.add_argument(
        "--folder", metavar="DIR", help="the study folder (default: the file's folder: key, else studies/NAME)"
    )
    parser.add_argument("--data", metavar="DIR", help="the data folder, in place of the file's data.path")
    parser.add_argument("--json", action="store_true", help="print results.json (or the plan, with --dry-run) as JSON")
    parser.add_argument(
        "--trust-code",
        action="store_true",
        help="let the study file name module.path:callable models (runs their Python code)",
    )


def run(args) -> int:
    from tightfit.study.spec import load_study

    if args.dry_run:
        import argparse

        from tightfit.cli import plan as plan_command

        load_study(
            args.study, trust_code=args.trust_code, data_path=args.data
        )  # the run's checks too (data, weights), before the plan
        parser = argparse.ArgumentParser()
        plan_command.add_arguments(parser)
        flags = (["--json"] if args.json else []) + (["--trust-code"] if args.trust_code else [])
        return plan_command.run(parser.parse_args([args.study, *flags]))
    config = load_study(args.study, trust_code=args.trust_code, data_path=getattr(args, "data", None))
    if args.folder:
        config.folder = args.folder
    from tightfit.study.runner import run_study

    results = run_study(config, resume=args.resume, only=args.only)
    from tightfit.report.build import write_report

    page = write_report(config.folder)
    if args.json:
        from tightfit.cli._output import print_json

        print_json(results)
    else:
        from tightfit.cli._output import console

        console().print(f"results: {config.folder}/results.md, results.json and {page.name}")
    return 0
