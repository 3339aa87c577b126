"""``peftkit merge RUN_OR_ADAPTER --output-dir OUT``: fold the adapter into the base weights.

The result is an ordinary transformers model folder (plus the tokenizer) that loads without peftkit.
It is written to a temporary folder and renamed into place, so OUT is either complete or absent.
"""

from __future__ import annotations

from pathlib import Path

from peftkit.train.checkpoint import atomic_dir

from . import common
from .errors import UserError
from .parser import Parser

HELP = "merge an adapter into its base model and save a standalone model folder"


def build_parser() -> Parser:
    p = Parser(prog="peftkit merge", description=HELP)
    p.add_argument("path", metavar="RUN_OR_ADAPTER", help="run folder or adapter folder")
    p.add_argument("--output-dir", "-o", required=True, help="folder for the merged model (must not exist)")
    p.add_argument("--model", help="base model folder (default: the run's model or the adapter's base)")
    p.add_argument("--task", choices=("classification", "causal-lm"), help="default: from the run or adapter")
    p.add_argument("--no-safe-merge", dest="safe_merge", action="store_false",
                   help="skip the check that merged weights are finite")
    return p


def merge(args) -> Path:
    out = Path(args.output_dir)
    if out.exists():
        raise UserError(f"{str(out)!r} already exists; pick a new --output-dir for the merged model")
    located = common.locate_adapter(args.path)
    task = common.task_of(located, args.task)
    base = common.base_model_of(located, task, args.model)
    label2id = (common.labels_of(located) or _labels_from_head(located)) if task == "classification" else None
    model = common.load_peft(located, task, base, label2id)
    merged = model.merge_and_unload(safe_merge=args.safe_merge)
    tokenizer_dir = located.adapter_dir if (located.adapter_dir / "tokenizer_config.json").is_file() else base
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp))
        common.load_tokenizer(tokenizer_dir).save_pretrained(str(tmp))
    return out


def _labels_from_head(located: common.Located) -> dict:
    """Without a run folder, size the head from the saved classifier weights."""
    n = common.head_size(located.adapter_dir)
    if n is None:
        raise UserError("cannot tell how many labels the classifier has; pass a run folder or a base model with a head")
    return {f"LABEL_{i}": i for i in range(n)}


def run(argv: list[str]) -> int:
    out = merge(build_parser().parse_args(argv))
    print(f"merged model saved to {out}")
    return 0
