"""``peftkit params``: trainable-parameter counts of a method on a model, without weights or training.

    peftkit params                                        # LoRA (train's defaults) on bundled MiniLM
    peftkit params --model llama-3-8b --r 16 --target-modules q_proj v_proj
    peftkit params --model path/to/config.json --method ia3
    peftkit params --model smollm2 --all-methods          # every registered method, its defaults

The adapter is injected by the engine into the model built on the meta device, so the counts are
those ``get_peft_model(...).print_trainable_parameters()`` reports, for any registered method.
"""

from __future__ import annotations

import json

from . import skeleton
from .errors import UserError
from .parser import Parser
from .train import method_spec

OWN = {"method", "model", "task", "num_labels", "all_methods", "json"}
HELP = "count a method's trainable parameters on a model (bundled, a config, or e.g. llama-3-8b), no weights"


def build_parser(spec) -> Parser:
    parser = Parser(prog="peftkit params", description=HELP)
    skeleton.add_model_flags(parser)
    parser.add_argument("--all-methods", action="store_true", help="count every registered method with its defaults")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    skeleton.add_method_flags(parser, spec, set(OWN))
    return parser


def counts(argv: list[str]) -> tuple[list, object]:
    from peftkit.analysis.params import count
    from peftkit.analysis.shapes import build_meta
    from peftkit.registry import list_methods

    spec = method_spec(skeleton.pre_parse(argv).method)
    args = build_parser(spec).parse_args(argv)
    src = skeleton.model_source(args)
    method_flags = {k: v for k, v in vars(args).items() if k not in OWN}  # method flags exist only when given
    if args.all_methods and (method_flags or "--method" in argv):
        raise UserError("--all-methods counts every method with its defaults; drop --method and the method options")
    specs = [method_spec(n) for n in list_methods()] if args.all_methods else [spec]
    found = []
    for one in specs:
        config = skeleton.method_config(one, src.task, args.model, method_flags if one is spec else {})
        try:
            found.append(count(build_meta(src), config, one.name)[0])
        except ValueError as err:
            raise UserError(f"cannot apply {one.name} to {src.name}: {' '.join(str(err).split())}") from None
    return found, (args, src)


def render(found: list, src) -> str:
    lines = [f"model: {src.name} ({src.config.model_type}, {src.task}), {found[0].base:,} base parameters", "",
             f"{'method':<10} {'trainable':>14} {'% of base':>10} {'all params':>16}  modules"]
    for c in found:
        lines.append(f"{c.method:<10} {c.trainable:>14,} {c.percent_of_base:>9.4f}% {c.total:>16,}  {c.adapted_modules}")
    for c in found:
        parts = ", ".join(f"{name} {n:,}" for name, n in sorted(c.by_module.items(), key=lambda kv: -kv[1]))
        lines.append(f"  {c.method} by module: {parts}")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    found, (args, src) = counts(argv)
    if args.json:
        print(json.dumps({"model": src.name, "task": src.task, "counts": [c.to_dict() for c in found]}, indent=2))
    else:
        print(render(found, src))
    return 0
