"""peftkit's Trainer on one GPU with fused_kernels off and auto: what `peftkit train` users get.

    PYTHONPATH=src python benchmarks/trainer_gpu.py --shape 1b --steps 12 [--quantize nf4]

The 1B Llama shape of train_throughput.py with random weights, built in fp32 as the CLI loads
models, LoRA r=16 alpha=16 on all seven projections, precision bf16, random token rows of 1024
(attention mask given, as the CLI's collator does). Two runs in this process:

  off    TrainingArguments(fused_kernels="off"): the fp32 base under bf16 autocast
  auto   the default on a GPU: the frozen base cast to bf16 and patch_model (fused LoRA nodes,
         RMSNorm, SwiGLU, RoPE, linear + cross-entropy)

With --quantize nf4 the base is first quantized as `peftkit train --quantize nf4 --precision bf16`
does (NF4, double quantization, bf16 compute): QLoRA through the trainer.

Prints seconds per step over the steps after the first two (Triton compiles on the first), peak
memory, the patch report and the loss of each step; the two runs start from the same adapter.
"""

from __future__ import annotations

import argparse
import time

import torch

from train_throughput import SHAPES, TARGETS, free_memory  # noqa: E402


def build(shape: str, quantize: str | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit

    cfg = {k: v for k, v in SHAPES[shape].items() if k != "batch"}
    config = LlamaConfig(**cfg, rope_theta=500000.0, max_position_embeddings=8192, use_cache=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    if quantize:
        from peftkit.quant import QuantConfig, quantize_model

        model = quantize_model(model, QuantConfig(bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                                                  bnb_4bit_compute_dtype="bfloat16"))
    torch.manual_seed(1)
    return peftkit.get_peft_model(model, peftkit.LoraConfig(r=16, lora_alpha=16, target_modules=list(TARGETS)))


def rows(shape: str, n: int) -> list[dict]:
    batch, seq = SHAPES[shape]["batch"]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (n, seq), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


class StepClock:
    """Wall time of each optimizer step, read from the trainer's metrics callback-free: it wraps
    ``_train_step``'s caller by timing consecutive ``after_optimizer_step`` calls of the model."""

    def __init__(self, model):
        self.times, self.model, self.last = [], model, None
        self.inner = model.after_optimizer_step
        model.after_optimizer_step = self

    def __call__(self, step: int) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        self.inner(step)


def run(mode: str, args) -> dict:
    from peftkit.train import Trainer, TrainingArguments

    free_memory()
    model = build(args.shape, args.quantize)
    batch = SHAPES[args.shape]["batch"][0]
    data = rows(args.shape, batch * args.steps)
    targs = TrainingArguments(task="causal-lm", batch_size=batch, max_steps=args.steps, learning_rate=1e-4,
                              precision="bf16", fused_kernels=mode, progress_bar=False, tensorboard=False,
                              lr_scheduler="constant", max_grad_norm=1.0, logging_steps=1)
    trainer = Trainer(model, targs, data)
    clock = StepClock(model)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = clock.times[1:]  # the first interval still holds Triton's compiles
    out = dict(mode=mode, step_s=sum(times) / len(times), peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               patched=str(trainer.patched), loss=trainer.state.get("last_train_loss"))
    del trainer, model
    free_memory()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quantize", choices=["nf4", "fp4"], default=None, help="4-bit base (QLoRA)")
    args = parser.parse_args()
    results = [run(mode, args) for mode in ("off", "auto")]
    batch, seq = SHAPES[args.shape]["batch"]
    base = f"{args.quantize} base" if args.quantize else "fp32 base"
    print(f"\nTrainer, {args.shape} shape, {base}, batch {batch} x {seq}, precision bf16, LoRA r=16 on all seven projections")
    for r in results:
        print(f"fused_kernels={r['mode']:5} {r['step_s'] * 1e3:8.1f} ms/step  {batch * seq / r['step_s']:8.0f} tok/s  "
              f"peak {r['peak_gib']:6.2f} GiB  last loss {r['loss']}  ({r['patched']})")
    off, auto = results
    print(f"auto vs off: {off['step_s'] / auto['step_s']:.2f}x tokens/s, {auto['peak_gib'] / off['peak_gib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
