"""Many LoRA adapters served from one base: a mixed-adapter batch, each row with its own adapter.

    python benchmarks/mixed_adapters.py --adapters 4,32 --batch 32 --prompt 128 --new 64

A Llama-shaped model (the 1B shape of train_throughput.py, random bf16 weights, SDPA), n LoRA
adapters (r=16, q,k,v,o,gate,up,down, random B so every adapter matters), rows assigned to the
adapters round-robin. Per contender, in this process, on the same prompts:

  peftkit          PeftModel.generate(adapter_names=...): stacked path (methods/lora/mixed.py)
  peftkit_loop     the same with the stacked path switched off: one gather / two matmuls /
                   index_add per adapter per layer (what the engine did before)
  hf_peft          HF PEFT's generate(adapter_names=...) on the same adapters
  one_adapter      peftkit with a single adapter for every row (no mixing): the ceiling

It reports the prefill time (one forward over the prompts), greedy decode tokens/s, peak memory,
and the largest difference of the prompts' last logits from peftkit's (beside the logits' spread).
"""

from __future__ import annotations

import argparse
import time

import torch

from train_throughput import TARGETS, build_model  # noqa: E402  (benchmarks/ is the script's folder)


def add_adapters(model, n: int, library: str):
    """n adapters with random A and B (init_lora_weights=False), seeds fixed per adapter."""
    lib = __import__(library)
    config = lambda: lib.LoraConfig(r=16, lora_alpha=16, target_modules=list(TARGETS),  # noqa: E731
                                    init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(100)
    peft_model = lib.get_peft_model(model, config(), adapter_name="a0")
    for i in range(1, n):
        torch.manual_seed(100 + i)
        peft_model.add_adapter(f"a{i}", config())
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # keep the deltas small next to the base (random A, B of ~1e-2)
            p.data.mul_(1e-2)
    return peft_model.to(device="cuda", dtype=torch.bfloat16).eval()


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    out = fn()  # warm-up (and the answer)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat, out


def run(contender: str, n: int, args) -> dict:
    model = build_model("1b").eval()
    model.config.use_cache = True
    library = "peft" if contender == "hf_peft" else "peftkit"
    peft_model = add_adapters(model, 1 if contender == "one_adapter" else n, library)
    names = [f"a{i % n}" for i in range(args.batch)] if contender != "one_adapter" else None
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 128256, (args.batch, args.prompt), device="cuda", generator=gen)
    kwargs = {} if names is None else {"adapter_names": names}
    from peftkit.methods.lora.layer import LoraLinear
    stacked = LoraLinear.stacked_mixed_batch
    if contender == "peftkit_loop":
        LoraLinear.stacked_mixed_batch = lambda self: False
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        prefill, logits = timed(lambda: peft_model(input_ids=ids, **kwargs).logits[:, -1].float())
        generate = lambda: peft_model.generate(input_ids=ids, max_new_tokens=args.new,  # noqa: E731
                                               min_new_tokens=args.new, do_sample=False, **kwargs)
        total, tokens = timed(generate, repeat=2)
    LoraLinear.stacked_mixed_batch = stacked
    decode = max(total - prefill, 1e-9)
    return dict(contender=contender, adapters=n, prefill_ms=prefill * 1e3,
                decode_tok_s=args.batch * args.new / decode, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                tokens=tokens[:, args.prompt:].cpu(), logits=logits.cpu())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="4,32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--contenders", default="peftkit,peftkit_loop,hf_peft,one_adapter")
    args = parser.parse_args()
    print(f"1B shape, bf16, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens (greedy)")
    print(f"{'contender':14} {'adapters':>8} {'prefill ms':>11} {'decode tok/s':>13} {'peak GiB':>9} "
          f"{'vs peftkit':>10} {'max|dlogit|':>12}")
    for n in [int(v) for v in args.adapters.split(",")]:
        rows = [run(c, n, args) for c in args.contenders.split(",")]
        ref = rows[0]
        print(f"-- {n} adapters; logits' standard deviation {ref['logits'].std().item():.3f}")
        for r in rows:
            # greedy tokens of a random-weight model split at near-ties, so compare the prefill logits
            diff = "-" if r["contender"] == "one_adapter" else f"{(r['logits'] - ref['logits']).abs().max().item():.3f}"
            print(f"{r['contender']:14} {r['adapters']:8d} {r['prefill_ms']:11.1f} {r['decode_tok_s']:13.0f} "
                  f"{r['peak_gib']:9.2f} {r['decode_tok_s'] / ref['decode_tok_s']:9.2f}x {diff:>12}")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
