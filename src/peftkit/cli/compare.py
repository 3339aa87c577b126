"""``peftkit compare``: several methods on one task (same data, steps and seed), one table.

    peftkit compare                                # lora, ia3 and dora on the default job
    peftkit compare --methods lora ia3 --max-steps 30
    peftkit compare --methods lora:r=4 lora:r=16 dora:r=8:lora_alpha=16 adapter:bottleneck_size=32

A method is NAME or NAME:OPTION=VALUE[:OPTION=VALUE...] with the option names of
``peftkit train --method NAME --help`` (a list value is comma-separated: target_modules=query,value).
All other options go to ``peftkit train`` for every run, so the runs share data, seed and steps.
Outputs are as for ``peftkit sweep``: OUTPUT_DIR/NN-LABEL run folders and results.csv/json/png.
"""

from __future__ import annotations

from . import batch
from .errors import UserError
from .options import flag_name
from .parser import Parser

HELP = "train several methods on one task with the same data, steps and seed, and tabulate the results"


def build_parser() -> Parser:
    parser = Parser(prog="peftkit compare", description=HELP,
                    epilog="Other options go to `peftkit train` for every run (see `peftkit train --help`).")
    parser.add_argument("--methods", nargs="+", default=["lora", "ia3", "dora"], metavar="METHOD[:OPT=VAL]",
                        help="methods to compare, each optionally with its options (default: lora ia3 dora)")
    parser.add_argument("--output-dir", help="folder for the runs and the tables (default: runs/compare-<time>)")
    return parser


def method_argv(entry: str) -> tuple[str, list[str], dict]:
    """``dora:r=8:target_modules=query,value`` -> ("dora", ["--method", "dora", "--r", "8", ...], options)."""
    name, *options = entry.split(":")
    argv, values = ["--method", name], {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key or not value:
            raise UserError(f"method option {option!r} in {entry!r} is not OPTION=VALUE; write e.g. {name}:r=16")
        argv += [flag_name(key), *value.split(",")]
        values[key] = value
    return name, argv, values


def plan(argv: list[str]) -> tuple[list[batch.Planned], object, list[str]]:
    args, rest = build_parser().parse_known_args(argv)
    batch.check_shared(rest, "compare")
    if "--method" in rest:
        raise UserError("compare takes its methods from --methods; drop --method")
    if len(set(args.methods)) != len(args.methods):
        raise UserError(f"--methods repeats an entry: {args.methods}; give each once")
    folder = batch.batch_dir(args.output_dir, "compare")
    planned = []
    for i, entry in enumerate(args.methods):
        name, own, values = method_argv(entry)
        planned.append(batch.Planned(entry, [*rest, *own], folder / batch.folder_name(i, entry), values))
    return planned, folder, rest


def run(argv: list[str]) -> int:
    planned, folder, shared = plan(argv)
    hint = " (options of one method go after its name in --methods, e.g. lora:r=16)"
    rows = batch.run_all(planned, folder, "method comparison", {"shared_options": shared}, hint)
    steps = {r["label"]: r.get("steps") for r in rows}
    if len(set(steps.values())) > 1:  # e.g. early stopping ended some runs sooner
        batch.train.report(f"note: the runs took different numbers of steps: {steps}")
    return 0
