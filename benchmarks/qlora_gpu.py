"""QLoRA on the GPU: peftkit's NF4 path against HF PEFT + bitsandbytes, in one process.

    PYTHONPATH=src python benchmarks/qlora_gpu.py --shapes 1b,8b --steps 10 --warmup 3

1. PagedAdamW on CUDA: after a few steps on random parameters its weights equal
   ``torch.optim.AdamW(foreach=False)``'s and its state (m, v) sits in pinned host memory.
2. Per shape (the Llama shapes of train_throughput.py, random bf16 weights, its batch sizes),
   LoRA r=16 alpha=16 on all seven projections, no checkpointing, no autocast (the model is bf16),
   the same token batch for every contender:

     bf16          peftkit on the bf16 base, patch_model (the fused path): what 4 bits cost
     nf4           peftkit, NF4 + double quantization, patch_model: the fused node rebuilds each
                   4-bit weight inside the LoRA node, right before its matmul (forward and dx)
     nf4_unpatched the same model without patch_model: one 4-bit LoRA node per linear, but
                   transformers' own norms, MLP and loss (full fp32 logits)
     nf4_paged     nf4 with peftkit's PagedAdamW (optimizer state in pinned host memory)
     hf_bnb        HF PEFT over bitsandbytes' Linear4bit (NF4, compress_statistics=True,
                   bf16 compute), torch's fused AdamW; as HF PEFT + bitsandbytes run QLoRA
     hf_bnb_paged  the same with bitsandbytes' PagedAdamW32bit (the QLoRA paper's optimizer)
     *_graph       bf16 / nf4 with the whole step recorded once as a CUDA graph and replayed
                   (peftkit.kernels.graph_train_step): the step at GPU speed, without Python's
                   per-kernel launch cost

   Every 4-bit contender starts from the same adapter weights (copied from the first one built),
   so the loss columns differ only by quantization details and arithmetic.
   Prints step time, tokens/s, peak memory, the weights' bytes, the ratios against hf_bnb and the
   per-step losses. bitsandbytes is optional: without it the hf_bnb rows say so.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from train_throughput import SHAPES, TARGETS, build_model, free_memory, make_batch, peak_gib, sync  # noqa: E402

ALL = ["bf16", "nf4", "nf4_unpatched", "nf4_paged", "hf_bnb", "hf_bnb_paged", "bf16_graph", "nf4_graph"]
GRAPH = "_graph"


def check_paged_adamw() -> None:
    from peftkit.train.paged_adamw import PagedAdamW

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(257, 129, device="cuda")) for _ in range(3)]
    refs = {foreach: [torch.nn.Parameter(p.detach().clone()) for p in ours] for foreach in (True, False)}
    opts = [PagedAdamW(ours, lr=1e-2, weight_decay=0.1, chunk_bytes=300_000)]  # two chunks
    opts += [torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=foreach) for foreach, ref in refs.items()]
    for step in range(5):
        for i, a in enumerate(ours):
            g = torch.randn_like(a, generator=torch.Generator(device="cuda").manual_seed(10 * step + i))
            a.grad = g.clone()
            for ref in refs.values():
                ref[i].grad = g.clone()
        for opt in opts:
            opt.step()
    state = opts[0].state[ours[0]]
    where = {k: (v.device.type, v.is_pinned()) for k, v in state.items() if torch.is_tensor(v) and v.dim()}
    for foreach, ref in refs.items():
        diff = max((a - b).abs().max().item() for a, b in zip(ours, ref))
        print(f"PagedAdamW on CUDA vs torch AdamW(foreach={foreach}): max |dw| = {diff:.3e}")
    print(f"PagedAdamW state: {where}")


def bnb_quantize(model: nn.Module) -> nn.Module:
    """Swap every target projection for bitsandbytes' Linear4bit (quantized as it lands on the GPU)."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name in TARGETS:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                          device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
                setattr(parent, child_name, layer.to("cuda"))
    return model


def build(name: str, shape: str):
    """(model, optimizer) for one contender."""
    name = name.removesuffix(GRAPH)
    model = build_model(shape)
    lora = dict(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS))
    if name.startswith("hf_bnb"):
        import peft

        model = peft.get_peft_model(bnb_quantize(model), peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    else:
        import peftkit
        from peftkit.kernels import patch_model
        from peftkit.quant import QuantConfig, quantize_model

        if name.startswith("nf4"):
            model = quantize_model(model, QuantConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_use_double_quant=True,
                                                      bnb_4bit_compute_dtype="bfloat16"))
        model = peftkit.get_peft_model(model, peftkit.LoraConfig(**lora))
        if name != "nf4_unpatched":
            patch_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "nf4_paged":
        from peftkit.train.paged_adamw import PagedAdamW

        return model, PagedAdamW(params, lr=1e-4)
    if name == "hf_bnb_paged":
        import bitsandbytes as bnb

        return model, bnb.optim.PagedAdamW32bit(params, lr=1e-4)
    return model, torch.optim.AdamW(params, lr=1e-4, fused=True)


def adapter_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise RuntimeError(f"adapter names differ between contenders: {missing[:3]}")
    with torch.no_grad():
        for n, value in state.items():
            params[n].copy_(value)


def weights_gib(model) -> float:
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in frozen) / 2**30


def run(name: str, shape: str, args, start: dict | None) -> tuple[dict, dict | None]:
    free_memory()
    try:
        model, opt = build(name, shape)
    except ImportError as err:
        return dict(name=name, note=f"skipped: {err}"), start
    if not name.startswith("bf16"):
        if start is None:
            start = adapter_state(model)
        else:
            load_adapter_state(model, start)
    batch = make_batch(shape)
    weights = weights_gib(model)
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []

    def train_step(b):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        step_fn, warmup = train_step, args.warmup
        if name.endswith(GRAPH):
            from peftkit.kernels import graph_train_step

            warm = []  # graph_train_step's warm-up steps are real steps: keep their losses
            step_fn = graph_train_step(lambda b: warm.append(train_step(b)) or warm[-1], batch, optimizers=[opt],
                                       warmup=args.warmup)
            losses, warmup = [x.item() for x in warm[:args.warmup]], 0
        for _ in range(warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            loss = step_fn(batch)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    except torch.OutOfMemoryError:
        model = opt = batch = None
        free_memory()
        return dict(name=name, note="OOM"), start
    step = sum(times[-args.steps:]) / args.steps
    out = dict(name=name, step_ms=step * 1e3, tok_s=batch["input_ids"].numel() / step, peak_gib=peak_gib(),
               weights_gib=weights, losses=losses, note="")
    if name in args.profile.split(","):
        profile(model, opt, batch, f"{name} {shape}")
    model = opt = batch = step_fn = None
    free_memory()
    return out, start


def profile(model, opt, batch, title: str, steps: int = 2) -> None:
    """GPU time per kernel over two steps, the largest first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
    print(f"\nprofile {title}, {steps} steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


def print_shape(shape: str, rows: list[dict]) -> None:
    batch, seq = SHAPES[shape]["batch"]
    print(f"\n{shape} shape, LoRA r=16 on all seven projections, batch {batch} x {seq}, bf16, no checkpointing")
    print(f"{'run':13} {'step ms':>8} {'tok/s':>8} {'peak GiB':>9} {'weights GiB':>12}  loss first -> last")
    for r in rows:
        if r.get("note"):
            print(f"{r['name']:13} {r['note']}")
            continue
        print(f"{r['name']:13} {r['step_ms']:8.1f} {r['tok_s']:8.0f} {r['peak_gib']:9.2f} {r['weights_gib']:12.2f}  "
              f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}")
    done = {r["name"]: r for r in rows if not r.get("note")}
    pairs = (("nf4", "hf_bnb"), ("nf4_graph", "hf_bnb"), ("nf4_paged", "hf_bnb_paged"), ("nf4", "nf4_unpatched"),
             ("nf4", "bf16"), ("nf4_graph", "bf16_graph"))
    for ours, theirs in pairs:
        if ours in done and theirs in done:
            a, b = done[ours], done[theirs]
            print(f"{ours} vs {theirs}: tokens/s {a['tok_s'] / b['tok_s']:.2f}x, peak memory "
                  f"{a['peak_gib'] / b['peak_gib']:.2f}x")
    if "nf4" in done and "hf_bnb" in done:
        gap = max(abs(x - y) / abs(y) for x, y in zip(done["nf4"]["losses"], done["hf_bnb"]["losses"]))
        print(f"nf4 vs hf_bnb per-step loss, same adapter start: max relative difference {gap:.2e}")
    for r in done.values():
        print(f"  losses {r['name']:13} " + " ".join(f"{v:.4f}" for v in r["losses"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", default=",".join(ALL), help=f"comma-separated, of {ALL}")
    parser.add_argument("--profile", default="", help="runs to profile (GPU time per kernel), comma-separated")
    args = parser.parse_args()
    check_paged_adamw()
    for shape in args.shapes.split(","):
        rows, start = [], None
        for name in args.runs.split(","):
            row, start = run(name, shape, args, start)
            rows.append(row)
        print_shape(shape, rows)


if __name__ == "__main__":
    main()
