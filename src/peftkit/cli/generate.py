"""``peftkit generate RUN_OR_ADAPTER_OR_MODEL --prompt TEXT``: chat completions from a causal LM.

The path may be a run folder, an adapter folder (loaded onto its base model) or a plain / merged
model folder. Prompts go through the tokenizer's chat template, as in training; ``--raw`` sends the
text as is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import common
from .errors import UserError
from .parser import Parser

HELP = "generate text with a causal-LM adapter (or merged model) from one or more prompts"


def build_parser() -> Parser:
    p = Parser(prog="peftkit generate", description=HELP)
    p.add_argument("path", metavar="RUN_OR_ADAPTER_OR_MODEL")
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeatable); default: read lines from stdin")
    p.add_argument("--model", help="base model folder (default: the run's model or the adapter's base)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--no-adapter", action="store_true", help="generate with the base model alone, for comparison")
    return p


def load(args):
    path = Path(args.path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        model_dir = common.check_model_folder(path)
        return common.load_causal_lm(model_dir), common.load_tokenizer(model_dir)
    located = common.locate_adapter(path)
    if common.task_of(located) != "causal-lm":
        raise UserError(f"{args.path!r} holds a {common.task_of(located)} adapter; generate needs a causal-LM one")
    base = common.base_model_of(located, "causal-lm", args.model)
    tokenizer_dir = located.adapter_dir if (located.adapter_dir / "tokenizer_config.json").is_file() else base
    if args.no_adapter:
        return common.load_causal_lm(base), common.load_tokenizer(tokenizer_dir)
    return common.load_peft(located, "causal-lm", base, None, quantized=True), common.load_tokenizer(tokenizer_dir)


@torch.no_grad()
def complete(model, tokenizer, prompt: str, args) -> str:
    if args.raw:
        ids = tokenizer(prompt, return_tensors="pt")
        batch = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    else:
        from peftkit.data.causal_lm import prompt_batch

        batch = prompt_batch(tokenizer, [prompt])
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 else {"do_sample": False}
    out = model.generate(**batch, max_new_tokens=args.max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    prompts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise UserError("no prompt given; pass --prompt TEXT (repeatable) or pipe prompts on stdin, one per line")
    model, tokenizer = load(args)
    model.eval()
    torch.manual_seed(args.seed)
    for prompt in prompts:
        text = complete(model, tokenizer, prompt, args)
        print(text if len(prompts) == 1 else f">>> {prompt}\n{text}\n", flush=True)
    return 0
