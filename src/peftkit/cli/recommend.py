"""``peftkit recommend``: a ranked list of fine-tuning methods for a GPU budget and serving needs.

    peftkit recommend --gpu-memory-gib 24 --model llama-3-8b --seq-len 1024 --data-size 20000
    peftkit recommend --gpu-memory-gib 16 --need-merge          # zero added inference latency
    peftkit recommend --gpu-memory-gib 80 --model llama-3-8b --multi-adapter

Every registered method (train's defaults for its options), full fine-tuning, and each method
over a 4-bit NF4 base are estimated with ``peftkit memory``'s formulas and ranked; the scoring
rules are in ``peftkit.analysis.recommend``. Each line says why it is where it is. Exit code 0
when the first choice fits the budget, 1 when nothing does (so scripts can gate on it).
"""

from __future__ import annotations

import dataclasses
import json

from peftkit.analysis.memory import MemoryOptions
from peftkit.analysis.recommend import Constraints

from . import skeleton
from .errors import UserError
from .options import add_dataclass_flags
from .parser import Parser
from .train import method_spec

HELP = "rank fine-tuning methods for a GPU memory budget, model size, data size and serving needs"


def build_parser() -> Parser:
    parser = Parser(prog="peftkit recommend", description=HELP)
    skeleton.add_model_flags(parser)
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="consider only these methods (default: all)")
    parser.add_argument("--json", action="store_true", help="print the ranking as JSON")
    taken = {"method", "model", "task", "num_labels", "methods", "json"}
    add_dataclass_flags(parser.add_argument_group("constraints"), Constraints, set(), taken)
    add_dataclass_flags(parser.add_argument_group("training shape"), MemoryOptions, set(), taken)
    return parser


def ranking(argv: list[str]):
    from peftkit.analysis.recommend import recommend
    from peftkit.registry import list_methods

    args = build_parser().parse_args(argv)
    if "--method" in argv:
        raise UserError("recommend compares methods; use --methods NAME ... to limit which ones")
    if not hasattr(args, "gpu_memory_gib"):
        raise UserError("--gpu-memory-gib is required: the memory of the GPU to train on, e.g. --gpu-memory-gib 24")
    src = skeleton.model_source(args)
    opts, limits = skeleton.dataclass_values(args, MemoryOptions), skeleton.dataclass_values(args, Constraints)
    names = args.methods or list_methods()
    configs = {n: skeleton.method_config(method_spec(n), src.task, args.model, {}) for n in names}
    try:
        return recommend(src, configs, opts, limits), src, opts, limits, args
    except ValueError as err:
        raise UserError(f"cannot estimate the methods on {src.name}: {' '.join(str(err).split())}") from None


def render(ranked, src, opts: MemoryOptions, limits: Constraints) -> str:
    lines = [f"model: {src.name} ({src.config.model_type}, {src.task}); GPU {limits.gpu_memory_gib:g} GiB; "
             f"{limits.data_size:,} examples x {opts.seq_len} tokens; batch {opts.batch_size}, {opts.dtype}", ""]
    for i, c in enumerate(ranked, 1):
        mark = "" if c.fits else "  (does not fit)"
        lines.append(f"{i:>2}. {c.name:<10} {c.estimate.total / 1024 ** 3:>8.2f} GiB{mark}")
        lines += [f"      - {reason}" for reason in c.reasons]
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    ranked, src, opts, limits, args = ranking(argv)
    if args.json:
        print(json.dumps({"model": src.name, "constraints": dataclasses.asdict(limits),
                          "options": dataclasses.asdict(opts), "ranking": [c.to_dict() for c in ranked]}, indent=2))
    else:
        print(render(ranked, src, opts, limits))
    return 0 if ranked and ranked[0].fits else 1
