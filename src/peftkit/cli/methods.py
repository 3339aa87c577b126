"""``peftkit methods``: the PEFT methods this installation supports, one name per line."""

from __future__ import annotations

from .parser import Parser

HELP = "list the PEFT methods this version supports, one per line"


def build_parser() -> Parser:
    parser = Parser(prog="peftkit methods", description=HELP)
    parser.add_argument("--verbose", "-v", action="store_true", help="add each method's HF peft_type and summary")
    return parser


def run(argv: list[str]) -> int:
    from peftkit.registry import get_method, list_methods

    args = build_parser().parse_args(argv)
    for name in list_methods():
        spec = get_method(name)
        print(f"{name}\t{spec.peft_type}\t{spec.summary}" if args.verbose else name)
    return 0
