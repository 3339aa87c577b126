"""``peftkit eval RUN_OR_ADAPTER``: held-out metrics of a saved adapter.

Given a run folder it rebuilds the run's own held-out split from its config.yaml (same data, seed
and max_length), so it reproduces the ``after`` number in summary.json. ``--data`` evaluates on
another file instead (all of it, or its split with ``--split``).
"""

from __future__ import annotations

import json

from peftkit.train import Trainer, TrainingArguments

from . import common
from .errors import UserError
from .parser import Parser
from .runconfig import DataOptions

HELP = "evaluate a saved adapter on held-out data (accuracy/F1 or loss/perplexity)"


def build_parser() -> Parser:
    p = Parser(prog="peftkit eval", description=HELP)
    p.add_argument("path", metavar="RUN_OR_ADAPTER", help="run folder or adapter folder")
    p.add_argument("--model", help="base model folder (default: the run's model or the adapter's base)")
    p.add_argument("--task", choices=("classification", "causal-lm"), help="default: from the run or adapter")
    p.add_argument("--data", help="evaluate on this file instead of the run's held-out split")
    p.add_argument("--split", action="store_true", help="with --data: only the held-out split, not the whole file")
    for name in ("text_column", "label_column", "question_column", "answer_column"):
        p.add_argument("--" + name.replace("_", "-"), dest=name)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    return p


def data_options(args, located: common.Located) -> tuple[DataOptions, int]:
    """The run's data options (when a run folder) with the user's flags on top; plus the split seed."""
    run = located.run_config or {}
    base = dict(run.get("data") or {})
    seed = (run.get("training") or {}).get("seed", 42)
    if args.data:
        base.update(path=args.data, eval_path=None if args.split else args.data, max_eval_samples=None)
    elif not run:
        raise UserError(f"{args.path!r} is an adapter folder, not a run folder; pass --data FILE to evaluate on")
    for name in ("text_column", "label_column", "question_column", "answer_column", "max_eval_samples", "max_length"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    return DataOptions(**base), seed


def evaluate(args) -> dict:
    located = common.locate_adapter(args.path)
    task = common.task_of(located, args.task)
    base = common.base_model_of(located, task, args.model)
    opts, seed = data_options(args, located)
    tokenizer = common.load_tokenizer(base)
    data = common.build_data(task, tokenizer, opts, seed, label2id=common.labels_of(located))
    model = common.load_peft(located, task, base, data.label2id, quantized=True)
    targs = TrainingArguments(task=task, eval_batch_size=args.batch_size, device=args.device, progress_bar=False)
    metrics = Trainer(model, targs, eval_dataset=data.eval, collate_fn=data.collate).evaluate()
    return {"task": task, "adapter": str(located.adapter_dir), "examples": len(data.eval), **metrics}


def run(argv: list[str]) -> int:
    print(json.dumps(evaluate(build_parser().parse_args(argv)), indent=2))
    return 0
