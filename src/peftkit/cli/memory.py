"""``peftkit memory``: estimated training memory of full fine-tuning vs a method vs QLoRA.

    peftkit memory                                            # bundled MiniLM, LoRA, batch 8 x 512
    peftkit memory --model llama-3-8b --r 16 --batch-size 4 --seq-len 2048 --gradient-checkpointing
    peftkit memory --model llama-3-8b --optimizer paged-adamw-8bit --no-double-quant

Three rows: full fine-tuning, the method on the base in ``--dtype``, and the method over a 4-bit
NF4 base ("q" + the method's name: qlora). Each is split into weights, gradients, optimizer states
and activations; the formulas are in ``peftkit.analysis.memory`` and ``peftkit.analysis.activations``.
"""

from __future__ import annotations

import dataclasses
import json

from peftkit.analysis.memory import MemoryOptions

from . import skeleton
from .errors import UserError
from .options import add_dataclass_flags
from .parser import Parser
from .train import method_spec

HELP = "estimate training memory: full fine-tuning vs the method vs QLoRA (weights, grads, optimizer, activations)"
OWN = {"method", "model", "task", "num_labels", "json"}


def build_parser(spec) -> Parser:
    parser = Parser(prog="peftkit memory", description=HELP,
                    epilog="Not counted: the CUDA context and allocator fragmentation (leave about 10%).")
    skeleton.add_model_flags(parser)
    parser.add_argument("--json", action="store_true", help="print the estimates as JSON")
    taken = set(OWN)
    add_dataclass_flags(parser.add_argument_group("training shape"), MemoryOptions, set(), taken)
    skeleton.add_method_flags(parser, spec, taken)
    return parser


def estimates(argv: list[str]):
    from peftkit.analysis.memory import compare

    spec = method_spec(skeleton.pre_parse(argv).method)
    parser = build_parser(spec)
    args = parser.parse_args(argv)
    src = skeleton.model_source(args)
    opts = skeleton.dataclass_values(args, MemoryOptions)
    config = skeleton.method_config(spec, src.task, args.model, vars(args))
    try:
        return compare(src, config, opts, spec.name), src, opts, args
    except ValueError as err:
        raise UserError(f"cannot estimate {spec.name} on {src.name}: {' '.join(str(err).split())}") from None


def render(found, src, opts: MemoryOptions) -> str:
    ckpt = "with" if opts.gradient_checkpointing else "without"
    dq = "on" if opts.double_quant else "off"
    lines = [f"model: {src.name} ({src.config.model_type}), {opts.dtype}, batch {opts.batch_size} x {opts.seq_len} "
             f"tokens, {opts.optimizer}, {ckpt} gradient checkpointing, NF4 double quantization {dq}", "",
             f"{'regime':<10} {'trainable':>14} {'weights':>9} {'grads':>9} {'optimizer':>9} {'activ.':>9} {'total':>9}  GiB"]
    for e in found:
        lines.append(f"{e.regime:<10} {e.trainable:>14,} {skeleton.gib(e.weights):>9} {skeleton.gib(e.gradients):>9} "
                     f"{skeleton.gib(e.optimizer):>9} {skeleton.gib(e.activations.peak):>9} {skeleton.gib(e.total):>9}")
    if any(e.paged_optimizer for e in found):
        lines.append("paged optimizer: its states can move to CPU memory under pressure (counted in full above)")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    found, src, opts, args = estimates(argv)
    if args.json:
        print(json.dumps({"model": src.name, "options": dataclasses.asdict(opts),
                          "estimates": [e.to_dict() for e in found]}, indent=2))
    else:
        print(render(found, src, opts))
    return 0
