"""LoRA training throughput and memory on one GPU: peftkit vs HF PEFT vs the frozen ceiling.

    python benchmarks/train_throughput.py --shapes 1b,8b --steps 10 --warmup 3 --checkpointing both

Llama-shaped models with random weights (bf16, SDPA attention), LoRA r=16 alpha=16 dropout 0 on
q,k,v,o,gate,up,down, AdamW (fused) on the adapters. Every contender runs in this process on a
model rebuilt from the same seed and on the same batch (full 1024-token rows, no padding, so
no attention mask: causal SDPA):

  peftkit        peftkit.get_peft_model + peftkit.kernels.patch_model (fused RMSNorm, SwiGLU,
                 RoPE, linear+cross-entropy)
  hf_peft        peft.get_peft_model with its defaults (adapter weights upcast to float32)
  frozen         no adapter, nothing trainable, backward through the activations only
                 (input embeddings require grad), patched like peftkit: our ceiling
  frozen_hf      the same, unpatched: transformers' own ceiling
  peftkit_unshared (diagnostic, not run by default) peftkit with q,k,v and gate,up each run alone
  peftkit_twokernel (diagnostic, not run by default) peftkit on the path before run 11: expand +
                    addmm_ instead of one GEMM (lora_gemm), two products for gb and dB
                 (run 5's path), for an A/B of lora_linears_shared in one process
  peftkit_plain  (diagnostic, not run by default) peftkit's LoRA without patch_model
  *_graph        the same contender with the whole step (forward, backward, optimizer) recorded
                 once as a CUDA graph and replayed (peftkit.kernels.graph_train_step); with
                 checkpointing, preserve_rng_state=False (no dropout, so no RNG to replay)

FLOPs per token = 4 x frozen matmul params + 6 x trainable params + attention, where frozen
matmul params are the decoder's linear weights plus the LM head (the embedding lookup is not a
matmul) and attention is PaLM appendix B's 12 * layers * d_model * seq (QK^T and AV, forward 2x
+ backward 4x, no causal discount). Peak = a timed 8192^3 bf16 matmul on the same card.

Eager steps are host-bound on some hosts, and host speed drifts within a process by several ms per
step (benchmarks/NOTES.md, run 13): --repeats N runs the contenders round robin N times and the
table keeps each one's median run, with every run's step time in its note.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # hidden, layers, ffn, heads, kv heads, vocab, tied embeddings, batch
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, batch=(8, 1024)),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, batch=(4, 1024)),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False, batch=(2, 32)),
}
DEVICE = "cuda"  # --device cpu runs the tiny shape as a smoke test of this script
CONTENDERS = ["peftkit", "hf_peft", "frozen", "frozen_hf", "peftkit_graph", "frozen_graph"]
GRAPH = "_graph"


@dataclass
class Result:
    shape: str
    checkpointing: bool
    contender: str
    step_s: float = float("nan")
    tokens_per_s: float = float("nan")
    peak_gib: float = float("nan")
    tflops: float = float("nan")
    mfu: float = float("nan")
    note: str = ""


# ----------------------------------------------------------------------------- model and data
def build_model(shape: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in SHAPES[shape].items() if k != "batch"}
    config = LlamaConfig(**cfg, rope_theta=500000.0, max_position_embeddings=8192, use_cache=False,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def make_batch(shape: str, seed: int = 1) -> dict:
    batch, seq = SHAPES[shape]["batch"]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), device=DEVICE, generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}  # no padding, so no mask (no host sync on it)


def lora_kwargs() -> dict:
    return dict(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS))


def prepare(contender: str, model, checkpointing: bool):
    """Wrap `model` for one contender; returns (model to call, optimizer or None)."""
    graphed = contender.endswith(GRAPH)
    contender = contender.removesuffix(GRAPH)
    if checkpointing:
        kwargs = {"use_reentrant": False} | ({"preserve_rng_state": False} if graphed else {})
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if contender in ("frozen", "frozen_hf"):
        model.requires_grad_(False)
        model.enable_input_require_grads()
        if contender == "frozen":
            from peftkit.kernels import patch_model
            patch_model(model)
        return model, None
    if contender == "hf_peft":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs()))
    else:
        import peftkit
        from peftkit.kernels import patch_model
        model = peftkit.get_peft_model(model, peftkit.LoraConfig(**lora_kwargs()))
        if contender in ("peftkit", "peftkit_unshared", "peftkit_twokernel"):
            patch_model(model)
        if contender == "peftkit_unshared":  # run 5's path: a (no-op) hook opts each projection out of sharing
            for name, module in model.named_modules():
                if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) and hasattr(module, "fused_adapter"):
                    module.register_forward_pre_hook(lambda *args: None)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, fused=True)


def train_step(model, opt, batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------- counting and timing
def flops_per_token(model, shape: str) -> tuple[float, int, int]:
    """(FLOPs per token, frozen matmul params, trainable params)."""
    cfg, seq = SHAPES[shape], SHAPES[shape]["batch"][1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(m.weight.numel() for n, m in model.named_modules()
                 if type(m) is torch.nn.Linear and "lora_" not in n)
    attention = 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq
    return 4 * frozen + 6 * trainable + attention, frozen, trainable


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    n = n if DEVICE == "cuda" else 512
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(reps + 3):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


def stepper(model, opt, batch, warmup: int, graphed: bool):
    """(step function of a batch returning a loss to keep, losses of the warm-up steps)."""
    warm = []

    def step(b):
        loss = train_step(model, opt, b)
        warm.append(loss.clone())  # during the capture this records a placeholder, dropped below
        return loss

    replay = step
    if graphed:
        from peftkit.kernels import graph_train_step
        replay = graph_train_step(step, batch, optimizers=[opt] if opt is not None else [], warmup=warmup)
    if replay is step:  # eager, or no CUDA to record on
        return (lambda b: train_step(model, opt, b)), [step(batch) for _ in range(warmup)]
    return (lambda b: replay(b).clone()), warm[:warmup]


def time_steps(model, opt, batch, steps: int, warmup: int, graphed: bool = False) -> tuple[float, list[float]]:
    """(seconds per step, losses of every step, warm-up included)."""
    step, losses = stepper(model, opt, batch, warmup, graphed)
    sync()
    t0 = time.perf_counter()
    losses += [step(batch) for _ in range(steps)]
    sync()
    return (time.perf_counter() - t0) / steps, [x.item() for x in losses]


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def free_memory():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- one contender
def kernel_choice(contender: str):
    """A context in which a peftkit_twokernel contender's LoRA nodes take the path from before run 11:
    no one-GEMM products and no one-pass gb / dB (A/B in one process)."""
    from peftkit.kernels import lora_linear

    if contender.removesuffix(GRAPH) == "peftkit_twokernel":
        return lora_linear.size_floors(1 << 62, 1 << 62)
    return contextlib.nullcontext()


def run_contender(contender, shape, checkpointing, args, peak) -> Result:
    with kernel_choice(contender):
        return _run_contender(contender, shape, checkpointing, args, peak)


def _run_contender(contender, shape, checkpointing, args, peak) -> Result:
    res = Result(shape, checkpointing, contender)
    free_memory()
    try:
        model, opt = prepare(contender, build_model(shape), checkpointing)
        batch = make_batch(shape)
        step_s, losses = time_steps(model, opt, batch, args.steps, args.warmup, contender.endswith(GRAPH))
        flops, _, _ = flops_per_token(model, shape)
        if contender in args.profile.split(",") and args.profile_checkpointing in ("both", ("off", "on")[checkpointing]):
            profile(model, opt, batch, f"{args.out_prefix}profile_{contender}_{shape}_ckpt{int(checkpointing)}.txt")
    except (torch.OutOfMemoryError, RuntimeError) as err:  # RuntimeError: a failed graph capture
        res.note = "OOM" if isinstance(err, torch.OutOfMemoryError) else f"failed: {str(err)[:160]}"
        model = opt = batch = None
        free_memory()
        return res
    tokens = batch["input_ids"].numel()
    res.step_s, res.tokens_per_s = step_s, tokens / step_s
    res.peak_gib = peak_gib()
    res.tflops = flops * res.tokens_per_s / 1e12
    res.mfu = res.tflops / peak
    res.note = f"loss {losses[0]:.4f}->{losses[-1]:.4f}"
    del model, opt, batch
    free_memory()
    return res


def profile(model, opt, batch, path: str, steps: int = 2):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            train_step(model, opt, batch)
        sync()
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    with open(path, "w") as fh:
        fh.write(table)
    if DEVICE == "cuda":  # GPU time per (op, input shapes): which products the time goes to
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=80)
        with open(path.replace(".txt", "_by_shape.txt"), "w") as fh:
            fh.write(by_shape)
    print(f"  profile -> {path}\n" + "\n".join(table.splitlines()[:22]), flush=True)


def sync_report(contender: str, shape: str, checkpointing: bool):
    """One eager step under torch.cuda.set_sync_debug_mode("warn"): where does the host wait?"""
    import collections
    import warnings

    model, opt = prepare(contender.removesuffix(GRAPH), build_model(shape), checkpointing)
    batch = make_batch(shape)
    train_step(model, opt, batch)  # first step: lazy initialisation is allowed to sync
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, opt, batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    print(f"sync check {contender} {shape} ckpt {checkpointing}: {sum(where.values())} synchronizing calls "
          f"in one step" + "".join(f"\n  {n:4d} x {loc}" for loc, n in where.most_common(8)), flush=True)
    del model, opt
    free_memory()


# ----------------------------------------------------------------------------- loss agreement
def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_curve(contender, shape, steps, lr, start_state):
    with kernel_choice(contender):
        return _loss_curve(contender, shape, steps, lr, start_state)


def _loss_curve(contender, shape, steps, lr, start_state):
    model, _ = prepare(contender, build_model(shape), checkpointing=False)
    if start_state is not None:
        missing = set(start_state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise RuntimeError(f"adapter names differ between contenders: {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start_state:
                    p.copy_(start_state[n])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    state = lora_state(model)
    batch = make_batch(shape)
    step, losses = stepper(model, opt, batch, 1, contender.endswith(GRAPH))
    losses = [x.item() for x in losses + [step(batch) for _ in range(steps - 1)]]
    del model, opt
    free_memory()
    return losses, state


def loss_agreement(shape: str, steps: int = 20, lr: float = 1e-3, ours: str = "peftkit,peftkit_graph") -> float:
    """Same adapter start, same batch, same optimizer: per-step loss of peftkit vs HF PEFT."""
    ref, start = loss_curve("hf_peft", shape, steps, lr, None)
    names = ours.split(",")
    curves = [loss_curve(name, shape, steps, lr, start)[0] for name in names]
    print(f"\nloss agreement on {shape}, {steps} steps, AdamW lr {lr}, same adapter start and batch")
    print(f"{'step':>4} {'hf_peft':>10} " + " ".join(f"{n:>13} {'rel diff':>9}" for n in names))
    worst = 0.0
    for i, a in enumerate(ref):
        rels = [abs(a - c[i]) / abs(a) for c in curves]
        worst = max([worst, *rels])
        print(f"{i:4d} {a:10.5f} " + " ".join(f"{c[i]:13.5f} {r:9.2e}" for c, r in zip(curves, rels)))
    print(f"max relative difference {worst:.2e} (target <= 1e-2): {'met' if worst <= 1e-2 else 'NOT met'}")
    return worst


def median_run(runs: list[Result]) -> Result:
    """The run with the median step time (the lower middle of an even count); with several runs its
    note lists every step time, so the spread between runs on this host is in the table."""
    if len(runs) == 1:
        return runs[0]
    ordered = sorted(runs, key=lambda r: (r.step_s != r.step_s, r.step_s))  # failed runs (nan) last
    mid = ordered[(len(ordered) - 1) // 2]
    spread = "/".join(f"{r.step_s:.4f}" for r in runs)
    return Result(**{**asdict(mid), "note": f"{mid.note}; median of {len(runs)} runs, step s {spread}"})


# ----------------------------------------------------------------------------- report
def print_table(results: list[Result], peak: float):
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(f"\nfinal table (peak bf16 matmul {peak:.0f} TFLOP/s on {card})")
    print(f"{'shape':5} {'ckpt':4} {'contender':13} {'step s':>7} {'tok/s':>9} {'peak GiB':>8} "
          f"{'TFLOP/s':>8} {'MFU':>6}  note")
    for r in results:
        print(f"{r.shape:5} {'on' if r.checkpointing else 'off':4} {r.contender:13} {r.step_s:7.3f} "
              f"{r.tokens_per_s:9.0f} {r.peak_gib:8.2f} {r.tflops:8.1f} {r.mfu:6.1%}  {r.note}")
    print_ratios(results)


def print_ratios(results: list[Result]):
    print("\nratios (peftkit / other): tokens/s, peak memory")
    keyed = {(r.shape, r.checkpointing, r.contender): r for r in results}
    against = {"peftkit": ("hf_peft", "frozen", "frozen_hf"), "peftkit_graph": ("hf_peft", "frozen_graph")}
    for (shape, ckpt, name), ours in keyed.items():
        for other in against.get(name, ()):
            r = keyed.get((shape, ckpt, other))
            if r is not None:
                print(f"  {shape} ckpt {'on ' if ckpt else 'off'} {name:13} vs {other:12}: "
                      f"{ours.tokens_per_s / r.tokens_per_s:5.2f}x speed, {ours.peak_gib / r.peak_gib:5.2f}x memory")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--checkpointing", default="both", choices=["both", "on", "off"])
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--loss-check", default="1b", help="shape for the 20-step loss check, or 'none'")
    parser.add_argument("--profile", default="", help="contenders to profile (2 steps, torch.profiler)")
    parser.add_argument("--profile-checkpointing", default="off", choices=["both", "on", "off"])
    parser.add_argument("--out-prefix", default="", help="prefix (folder/) for profile and JSON files")
    parser.add_argument("--device", default="cuda", help="cpu: smoke-test this script (--shapes tiny)")
    parser.add_argument("--sync-check", default="", help="contenders to run one step of under sync debug mode")
    parser.add_argument("--loss-contenders", default="peftkit,peftkit_graph", help="checked against hf_peft")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per contender, round robin; the table keeps each one's median run")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    peak = peak_matmul_tflops()
    print(f"peak bf16 matmul: {peak:.0f} TFLOP/s", flush=True)
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    for contender in filter(None, args.sync_check.split(",")):
        for ckpt in ckpts:
            sync_report(contender, args.shapes.split(",")[0], ckpt)
    results = []
    for shape in args.shapes.split(","):
        for ckpt in ckpts:
            runs: dict[str, list[Result]] = {}
            for _ in range(args.repeats):  # round robin: the host's drifts fall on every contender alike
                for contender in args.contenders.split(","):
                    t0 = time.time()
                    runs.setdefault(contender, []).append(run_contender(contender, shape, ckpt, args, peak))
                    print(f"{asdict(runs[contender][-1])}  ({time.time() - t0:.0f}s)", flush=True)
            results += [median_run(r) for r in runs.values()]
    if args.loss_check != "none":
        loss_agreement(args.loss_check, ours=args.loss_contenders)
    print_table(results, peak)
    with open(f"{args.out_prefix}results.json", "w") as fh:
        json.dump([asdict(r) for r in results], fh, indent=1)


if __name__ == "__main__":
    main()
