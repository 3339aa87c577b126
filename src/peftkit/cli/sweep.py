"""``peftkit sweep``: train once per value of one option (a rank sweep by default) and tabulate.

    peftkit sweep                                  # r = 2 4 8 16 of the default job (MiniLM + reviews)
    peftkit sweep --values 4 16 --max-steps 20 --task causal-lm
    peftkit sweep --param lora_alpha --values 8 16 32 --r 8

Every option that is not the sweep's own goes to ``peftkit train`` unchanged, so each run is the
train job with one option changed (same data, seed and steps). Each run's folder is
OUTPUT_DIR/NN-PARAM=VALUE; OUTPUT_DIR/results.csv, results.json and results.png hold the held-out
metric, trainable parameters, train time and peak memory per run. On a CPU the peak memory is the
process's resident high-water mark, which only grows over the sweep; on a GPU it is per run.
"""

from __future__ import annotations

from . import batch
from .errors import UserError
from .options import flag_name
from .parser import Parser

HELP = "train once per value of one option (default: LoRA rank r = 2 4 8 16) and tabulate the results"


def build_parser() -> Parser:
    parser = Parser(prog="peftkit sweep", description=HELP,
                    epilog="Other options go to `peftkit train` (see `peftkit train --help`).")
    parser.add_argument("--param", default="r", help="the option to sweep, as in train's flags (default: r)")
    parser.add_argument("--values", nargs="+", default=["2", "4", "8", "16"], metavar="VALUE",
                        help="values to try (default: 2 4 8 16)")
    parser.add_argument("--output-dir", help="folder for the runs and the tables (default: runs/sweep-<time>)")
    return parser


def plan(argv: list[str]) -> tuple[list[batch.Planned], object, list[str]]:
    args, rest = build_parser().parse_known_args(argv)
    batch.check_shared(rest, "sweep")
    flag = flag_name(args.param.removeprefix("--").replace("-", "_"))
    if flag in rest:
        raise UserError(f"{flag} is the swept option; give its values with --values, not as {flag}")
    if len(set(args.values)) != len(args.values):
        raise UserError(f"--values repeats a value: {args.values}; give each value once")
    folder = batch.batch_dir(args.output_dir, f"sweep-{args.param}")
    planned = [batch.Planned(f"{args.param}={v}", [*rest, flag, v], folder / batch.folder_name(i, f"{args.param}={v}"),
                             {args.param: v}) for i, v in enumerate(args.values)]
    return planned, folder, rest


def run(argv: list[str]) -> int:
    planned, folder, shared = plan(argv)
    swept = next(iter(planned[0].extra))
    batch.run_all(planned, folder, f"sweep of {swept}", {"swept": swept, "shared_options": shared})
    return 0
