"""peftkit's Trainer on one GPU with fused_kernels off and auto: what `peftkit train` users get.

    PYTHONPATH=src python benchmarks/trainer_gpu.py --shape 1b --steps 12 [--quantize nf4]

The 1B Llama shape of train_throughput.py with random weights, built in fp32 as the CLI loads
models, LoRA r=16 alpha=16 on all seven projections, precision bf16, random token rows of 1024
(attention mask given, as the CLI's collator does). Runs in this process (--modes):

  off     TrainingArguments(fused_kernels="off"): the fp32 base under bf16 autocast
  auto    the default on a GPU: the frozen base cast to bf16 and patch_model (fused LoRA nodes,
          RMSNorm, SwiGLU, RoPE, linear + cross-entropy); no autocast, which would change nothing
  auto_autocast  auto with autocast left on (the Trainer before run 14), for A/B runs
  graphs  auto with cuda_graphs=True: each step replayed from a CUDA graph

With --quantize nf4 the base is first quantized as `peftkit train --quantize nf4 --precision bf16`
does (NF4, double quantization, bf16 compute): QLoRA through the trainer.

Prints the median seconds per step over the steps after the first two (Triton compiles; graphed, the eager
first step and the recording), peak memory, the patch report, and how far each run's per-step
losses are from another's; all runs start from the same adapter.
"""

from __future__ import annotations

import argparse
import statistics
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
    """Wall time and loss of each optimizer step: wraps the trainer's ``_after_step``, which both the
    eager and the graphed loop call once per step, after the step's loss was read back."""

    def __init__(self, trainer):
        self.times, self.losses, self.last = [], [], None
        self.inner = trainer._after_step
        trainer._after_step = self

    def __call__(self, loss, *rest):
        torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        self.losses.append(loss)
        return self.inner(loss, *rest)


MODES = {"off": dict(fused_kernels="off"), "auto": dict(fused_kernels="auto"),
         "auto_autocast": dict(fused_kernels="auto"), "graphs": dict(fused_kernels="auto", cuda_graphs=True)}


def run(mode: str, args) -> dict:
    from peftkit.train import Trainer, TrainingArguments

    free_memory()
    model = build(args.shape, args.quantize)
    batch = SHAPES[args.shape]["batch"][0]
    data = rows(args.shape, batch * args.steps)
    targs = TrainingArguments(task="causal-lm", batch_size=batch, max_steps=args.steps, learning_rate=1e-4,
                              precision="bf16", progress_bar=False, tensorboard=False,
                              lr_scheduler="constant", max_grad_norm=1.0, logging_steps=1, **MODES[mode])
    trainer = Trainer(model, targs, data)
    if mode == "auto_autocast":  # the eager step as before run 14, for A/B runs: autocast on though redundant
        trainer.autocast_redundant = False
    clock = StepClock(trainer)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = clock.times[2:]  # the first steps hold Triton's compiles (and, graphed, the eager step and the recording)
    # median: with cuda_graphs a step's loss is read after the next step is issued, so two steps can
    # finish back to back (one interval near 0, the one before it a step long)
    out = dict(mode=mode, step_s=statistics.median(times), peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               patched=str(trainer.patched), loss=trainer.state.get("last_train_loss"), losses=clock.losses,
               times=times)
    del trainer, model
    free_memory()
    print(f"run {mode}: median {out['step_s'] * 1e3:.1f} ms/step; steps (ms) "
          + " ".join(f"{t * 1e3:.1f}" for t in times), flush=True)
    return out


def kernel_times(fn, steps: int = 2) -> dict[str, float]:
    """GPU time per kernel name (ms per step) over `steps` calls of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / 1e3 / steps for e in prof.key_averages() if e.self_device_time_total > 0}


def wall_ms(fn, calls: int, warmup: int = 1) -> float:
    """Wall milliseconds per call of fn, after `warmup` calls, the GPU drained at both ends."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def compare_loop(args) -> None:
    """Where the Trainer's step differs from the plain loop of train_throughput.py on the same model:
    GPU time per kernel of each variant, and the kernels whose time differs most."""
    from peftkit.train import Trainer, TrainingArguments

    model = build(args.shape, args.quantize)
    batch = SHAPES[args.shape]["batch"][0]
    data = rows(args.shape, batch * 3)
    trainer = Trainer(model, TrainingArguments(task="causal-lm", batch_size=batch, max_steps=3, precision="bf16",
                                               progress_bar=False, tensorboard=False, lr_scheduler="constant"), data)
    trainer.train()  # patched, cast, optimizer made, kernels compiled
    host = data[0:batch]
    cpu_batch = torch.utils.data.default_collate(host)
    dev = {k: v.cuda() for k, v in cpu_batch.items() if k != "attention_mask"}
    opt = trainer.optimizer

    def plain(autocast=False, clip=False, mask=False):
        inputs = dict(dev, attention_mask=cpu_batch["attention_mask"].cuda()) if mask else dev
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.float().backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {"trainer": lambda: trainer._optimizer_step([cpu_batch]), "plain": plain,
                "plain+autocast": lambda: plain(autocast=True), "plain+clip": lambda: plain(clip=True),
                "plain+mask": lambda: plain(mask=True)}
    kernels = {}
    for name, fn in variants.items():
        wall = wall_ms(fn, 5, warmup=2)
        kernels[name] = kernel_times(fn)
        print(f"{name:16} {wall:7.1f} ms/step wall, "
              f"{sum(kernels[name].values()):7.1f} ms/step of kernels", flush=True)
    base = kernels["plain"]
    for name in variants:
        if name == "plain":
            continue
        other = kernels[name]
        diffs = sorted(((other.get(k, 0.0) - base.get(k, 0.0), k) for k in set(base) | set(other)), reverse=True)
        print(f"\n{name} - plain, kernels that differ most (ms/step):")
        for d, k in diffs[:8] + diffs[-3:]:
            if abs(d) > 0.05:
                print(f"  {d:+7.2f}  {k[:150]}")


def replay_check(args) -> None:
    """Where a graphed Trainer step's time goes: the replay alone back to back, its kernels' sum, the
    replay with the input copies and the read, and the Trainer's whole step."""
    from peftkit.train import Trainer, TrainingArguments

    model = build(args.shape, args.quantize)
    batch = SHAPES[args.shape]["batch"][0]
    data = rows(args.shape, batch * 4)
    trainer = Trainer(model, TrainingArguments(task="causal-lm", batch_size=batch, max_steps=4, precision="bf16",
                                               progress_bar=False, tensorboard=False, lr_scheduler="constant",
                                               cuda_graphs=True), data)
    trainer.train()
    (recorded,) = trainer.graphs.recorded.values()
    cpu_batch = torch.utils.data.default_collate(data[:batch])
    variants = {"replay alone": recorded.graph.replay,
                "graphs.run + read": lambda: trainer.graphs.run([cpu_batch], [1.0]).read(),
                "trainer step + read": lambda: trainer._optimizer_step([cpu_batch])[0].read()}
    for name, fn in variants.items():
        wall = wall_ms(fn, 10)
        kernels = kernel_times(fn)
        print(f"{name:22} {wall:7.1f} ms/step wall, {sum(kernels.values()):7.1f} "
              f"ms/step of kernels", flush=True)
        if name == "replay alone":
            for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
                print(f"    {v:7.2f}  {k[:140]}")


def graph_variants(args) -> None:
    """Which part of the Trainer's step makes its graph slower than the plain loop's: each variant
    recorded with graph_train_step on the same patched model, replayed back to back."""
    from peftkit.kernels import graph_train_step
    from peftkit.train import Trainer, TrainingArguments

    model = build(args.shape, args.quantize)
    batch = SHAPES[args.shape]["batch"][0]
    data = rows(args.shape, batch * 2)
    trainer = Trainer(model, TrainingArguments(task="causal-lm", batch_size=batch, max_steps=1, precision="bf16",
                                               progress_bar=False, tensorboard=False, lr_scheduler="constant"), data)
    trainer.train()
    cpu_batch = torch.utils.data.default_collate(data[:batch])
    dev = {k: v.cuda() for k, v in cpu_batch.items() if k != "attention_mask"}
    weights = torch.ones(1, device="cuda")

    def plain(inputs, autocast):
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            loss = model(**inputs).loss
        loss.float().backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    variants = {"plain": lambda b: plain(b, False), "plain+autocast": lambda b: plain(b, True),
                "trainer step": lambda b: trainer._step_on_device([b], weights)}
    for name, fn in variants.items():
        step = graph_train_step(fn, dev, optimizers=[trainer.optimizer])
        wall = wall_ms(lambda: step(dev), 5)
        kernels = kernel_times(lambda: step(dev))
        attention = sum(v for k, v in kernels.items() if "sdpa" in k or "attention" in k or "flash" in k)
        print(f"{name:16} {wall:7.1f} ms/replay, kernels {sum(kernels.values()):6.1f} "
              f"ms, attention {attention:5.2f} ms", flush=True)
        step = None  # its graph and pool go before the next variant records
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quantize", choices=["nf4", "fp4"], default=None, help="4-bit base (QLoRA)")
    parser.add_argument("--modes", default="off,auto,graphs", help=f"comma-separated, of {sorted(MODES)}")
    parser.add_argument("--graph-variants", action="store_true", help="graph each part of the step on its own")
    parser.add_argument("--replay-check", action="store_true", help="time a graphed step's parts")
    parser.add_argument("--compare-loop", action="store_true", help="profile the Trainer's step against the plain loop")
    args = parser.parse_args()
    if args.compare_loop:
        return compare_loop(args)
    if args.replay_check:
        return replay_check(args)
    if args.graph_variants:
        return graph_variants(args)
    results = {}
    for mode in args.modes.split(","):  # a mode named twice runs twice (round robin); the last run is kept
        results[mode] = run(mode, args)
    batch, seq = SHAPES[args.shape]["batch"]
    base = f"{args.quantize} base" if args.quantize else "fp32 base"
    print(f"\nTrainer, {args.shape} shape, {base}, batch {batch} x {seq}, precision bf16, LoRA r=16 on all seven projections")
    for r in results.values():  # the last run of each mode; every run's line was printed as it finished
        print(f"{r['mode']:7} {r['step_s'] * 1e3:8.1f} ms/step  {batch * seq / r['step_s']:8.0f} tok/s  "
              f"peak {r['peak_gib']:6.2f} GiB  last loss {r['loss']}  ({r['patched']})")
        print("        step times (ms): " + " ".join(f"{t * 1e3:.1f}" for t in r["times"]))
    for a, b in (("off", "auto"), ("auto_autocast", "auto"), ("auto", "graphs"), ("off", "graphs")):
        if a in results and b in results:
            x, y = results[a], results[b]
            diff = max(abs(p - q) / abs(p) for p, q in zip(x["losses"], y["losses"]))
            print(f"{b} vs {a}: {x['step_s'] / y['step_s']:.2f}x tokens/s, {y['peak_gib'] / x['peak_gib']:.2f}x peak "
                  f"memory, per-step loss max relative difference {diff:.2e}")


if __name__ == "__main__":
    main()
