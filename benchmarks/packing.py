"""Padded vs packed causal-LM training: real (non-pad) tokens per second, and an epoch's work.

    python benchmarks/packing.py --device cpu --steps 4                       # 2-core CPU: a few steps
    python benchmarks/packing.py --device cuda --batch-size 32 --steps 30 --precision bf16 --patch
    (--random-init: SmolLM2's shape with random weights, for a machine that has the tokenizer only)

SmolLM2-135M-Instruct (bundled) with LoRA r=8 on q_proj, v_proj (the `peftkit train --task
causal-lm` preset) on the bundled Q/A pairs tokenised at --max-length. Two ways to batch the same
examples, in the trainer's seeded order (epoch 0):

  padded   one example per row, each batch right-padded to its longest example
           (CausalLMCollator, with attention_mask)
  packed   best-fit-decreasing rows of at most --max-length tokens (pack_dataset), each batch of
           rows right-padded to its longest row (PackedCollator: position_ids, no attention_mask)

Epoch columns count every batch of a full epoch without running the model: rows, batches, tokens
the model processes (padding included), real tokens, label tokens and the padding fraction. The
timed columns run --warmup untimed and then --steps timed training steps (forward, backward, AdamW)
on the first batches of the epoch, from the same adapter start for both, alternating padded and
packed steps (so a busy machine slows both alike), and divide the real tokens of the timed batches
by their time. A packed step holds more examples than a padded one, so compare
tokens/s, or epoch time = real tokens per epoch / real tokens per second.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from peftkit.data import IGNORE_INDEX, CausalLMCollator, build_causal_lm_dataset, qa_pairs
from peftkit.data.packing import PackedCollator, pack_dataset
from peftkit.train.loader import ResumableBatches

SEED = 42


@dataclass
class Epoch:
    rows: int
    batches: int
    processed: int  # tokens the model runs, padding included
    real: int  # tokens of text
    labels: int  # next-token targets the loss counts

    @property
    def padding(self) -> float:
        return 1 - self.real / self.processed


def real_tokens(batch: dict) -> int:
    """Tokens of text: the attention mask's ones, or for packed rows all positions but each row's padding."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["n_real"])


def with_real_count(collate):
    """Wrap a packed collator so each batch also says how many of its tokens are text (not padding)."""
    def call(features):
        batch = collate(features)
        if "position_ids" in batch:
            batch["n_real"] = sum(len(f["input_ids"]) for f in features)
        return batch
    return call


def epoch_stats(loader: ResumableBatches) -> Epoch:
    processed = real = labels = batches = 0
    for _, batch in loader.epoch(0):
        processed += batch["input_ids"].numel()
        real += real_tokens(batch)
        labels += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batches += 1
    return Epoch(len(loader.dataset), batches, processed, real, labels)


def model_and_optimizer(device: str, random_init: bool = False):
    import peftkit
    from peftkit.cli import common

    folder = common.bundled_model_dir("causal-lm")
    if random_init:  # SmolLM2's shape with seeded random weights: a GPU box without the 517 MB weights
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(SEED)
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    else:
        base = common.load_causal_lm(folder)
    torch.manual_seed(SEED)
    config = peftkit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = peftkit.get_peft_model(base, config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    return model, optimizer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Contender:
    """One way of batching with its own model (same seed, so the same adapter start) and step timer."""

    def __init__(self, loader: ResumableBatches, args):
        self.model, self.optimizer = model_and_optimizer(args.device, args.random_init)
        if args.patch:
            from peftkit.kernels import patch_model

            patch_model(self.model)
        self.batches, self.args = loader.epoch(0), args
        self.seconds, self.tokens, self.per_step = 0.0, 0, []

    def step(self, timed: bool) -> None:
        a = self.args
        _, batch = next(self.batches)
        n_real = real_tokens(batch)
        batch = {k: v.to(a.device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "n_real"}
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.precision]
        sync(a.device)
        t0 = time.perf_counter()
        with torch.autocast(a.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(a.device)
        if timed:
            self.per_step.append(time.perf_counter() - t0)
            self.seconds, self.tokens = self.seconds + self.per_step[-1], self.tokens + n_real


def run_interleaved(contenders: dict[str, Contender], args) -> None:
    """Alternate the contenders step by step, so load from other processes falls on both alike."""
    for step in range(args.warmup + args.steps):
        for contender in contenders.values():
            contender.step(timed=step >= args.warmup)


def loaders(tokenizer, args) -> dict[str, ResumableBatches]:
    data = build_causal_lm_dataset(qa_pairs(), tokenizer, max_length=args.max_length)
    packed = pack_dataset(data, args.max_length)
    padded_collate = CausalLMCollator.for_tokenizer(tokenizer)
    packed_collate = with_real_count(PackedCollator.for_tokenizer(tokenizer))
    return {"padded": ResumableBatches(data, args.batch_size, padded_collate, SEED),
            "packed": ResumableBatches(packed, args.batch_size, packed_collate, SEED)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (examples, or packed rows)")
    parser.add_argument("--max-length", type=int, default=96, help="truncation length and packed row length")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--patch", action="store_true", help="peftkit.kernels.patch_model (fused kernels)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--random-init", action="store_true",
                        help="SmolLM2's config with random weights (timing only; needs the tokenizer, not the weights)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peftkit.cli import common

    tokenizer = common.load_tokenizer(common.bundled_model_dir("causal-lm"))
    built = loaders(tokenizer, args)
    epochs = {mode: epoch_stats(loader) for mode, loader in built.items()}
    contenders = {mode: Contender(loader, args) for mode, loader in built.items()}
    run_interleaved(contenders, args)
    rows = [(mode, epochs[mode], c.tokens / c.seconds, statistics.median(c.per_step)) for mode, c in contenders.items()]
    print_table(rows, args)


def print_table(rows, args) -> None:
    print(f"SmolLM2-135M LoRA r=8 q,v on {args.device} ({args.precision}{', patch_model' if args.patch else ''}), "
          f"batch {args.batch_size}, max_length {args.max_length}, {args.steps} timed steps after {args.warmup}")
    head = ("mode", "rows/epoch", "batches/epoch", "tokens run/epoch", "real tokens/epoch", "label tokens/epoch",
            "padding", "step s (median)", "real tokens/s", "epoch s (est.)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for mode, e, speed, step in rows:
        cells = (mode, e.rows, e.batches, e.processed, e.real, e.labels, f"{e.padding:.1%}", f"{step:.3f}",
                 f"{speed:,.0f}", f"{e.real / speed:,.0f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    (_, _, padded, _), (_, _, packed, _) = rows
    print(f"packed / padded real tokens per second: {packed / padded:.2f}x")


if __name__ == "__main__":
    main()
