"""QLoRA on the GPU: a 4-bit NF4 base against a bf16 base, and the paged AdamW against torch's.

    PYTHONPATH=src python benchmarks/qlora_gpu.py --shape 1b --steps 8

1. PagedAdamW on CUDA: after a few steps on random parameters its weights equal
   ``torch.optim.AdamW(foreach=False)``'s and its state (m, v) sits in pinned host memory.
2. The 1B Llama shape of train_throughput.py (random weights), LoRA r=16 on all seven projections,
   batch 4 x 1024, no checkpointing, in this process: bf16 base + AdamW, NF4 (double-quantized)
   base + AdamW, NF4 base + PagedAdamW. Prints step time, tokens/s, peak memory and the weights'
   bytes, and the per-step losses (the NF4 runs start from the quantized model, so their losses
   differ from bf16's by the quantization error; they must fall like it).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from train_throughput import SHAPES, TARGETS, build_model, make_batch  # noqa: E402  (run from benchmarks/)


def check_paged_adamw() -> None:
    from peftkit.train.paged_adamw import PagedAdamW

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(257, 129, device="cuda")) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours, opt_ref = PagedAdamW(ours, lr=1e-2, weight_decay=0.1), torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1,
                                                                                         foreach=False)
    for step in range(5):
        for a, b in zip(ours, ref):
            g = torch.randn_like(a, generator=torch.Generator(device="cuda").manual_seed(step))
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
    state = opt_ours.state[ours[0]]
    where = {k: (v.device.type, v.is_pinned()) for k, v in state.items() if torch.is_tensor(v) and v.dim()}
    print(f"PagedAdamW on CUDA vs torch AdamW(foreach=False): max |dw| = {diff:.3e}; state {where}")


def run(name: str, args) -> dict:
    import peftkit
    from peftkit.quant import QuantConfig, quantize_model
    from peftkit.train.paged_adamw import PagedAdamW

    model = build_model(args.shape)
    if name.startswith("nf4"):
        model = quantize_model(model, QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16"))
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    model = peftkit.get_peft_model(model, peftkit.LoraConfig(r=16, lora_alpha=16, target_modules=list(TARGETS)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = PagedAdamW(params, lr=1e-4) if name.endswith("paged") else torch.optim.AdamW(params, lr=1e-4, fused=True)
    batch = make_batch(args.shape)
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step = sorted(times[2:])[len(times[2:]) // 2]
    tokens = batch["input_ids"].numel()
    out = dict(name=name, step_ms=step * 1e3, tok_s=tokens / step, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               weights_gib=weight_bytes / 2**30, losses=losses)
    del model, opt, batch
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", default="bf16,nf4,nf4_paged")
    args = parser.parse_args()
    check_paged_adamw()
    SHAPES[args.shape]["batch"] = (4, 1024)
    rows = [run(name, args) for name in args.runs.split(",")]
    print(f"\n{args.shape} shape, LoRA r=16 on all projections, batch 4 x 1024, bf16 autocast, no checkpointing")
    print(f"{'run':10} {'step ms':>8} {'tok/s':>8} {'peak GiB':>9} {'weights GiB':>12}  losses")
    for r in rows:
        print(f"{r['name']:10} {r['step_ms']:8.1f} {r['tok_s']:8.0f} {r['peak_gib']:9.2f} {r['weights_gib']:12.2f}  "
              + " ".join(f"{v:.3f}" for v in r["losses"]))


if __name__ == "__main__":
    main()
