"""`peftkit train` on 1 GPU vs 2 GPUs under torchrun (DDP and FSDP2): step time, tokens/s, memory, loss.

    python benchmarks/distributed_gpu.py                       # SmolLM2-135M (bundled), 40 steps, bf16
    python benchmarks/distributed_gpu.py --model tiny --steps 20
    python benchmarks/distributed_gpu.py --modes ddp --grad-accum 2 --precision fp32

Runs the real CLI three times on the bundled chat data (causal LM, LoRA on q_proj/v_proj): once on
GPU 0 with batch 2B, then ``torchrun --standalone --nproc-per-node 2`` with batch B per GPU, as
``--distributed ddp`` and ``--distributed fsdp``, so all three take the same global batch in the
same order and their loss curves should agree (to bf16 noise; closely in fp32). The training set is
cut to a multiple of the global micro-batch (2B): otherwise the ranks pad the epoch's last batch
with repeated examples (DistributedSampler semantics) and that step differs from 1 GPU. Reads each run
folder's metrics.jsonl and summary.json and prints, per run: median step time and tokens/s over the
steps after the warm-up, peak CUDA memory of every rank, and the largest per-step difference of the
training loss from the 1-GPU curve; the full curves go to OUT/results.json.

Needs 2 visible GPUs (``--device cpu`` dry-runs the same commands on gloo); nothing here is imported
by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RUNS = {"1gpu": None, "ddp": "ddp", "fsdp": "fsdp"}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (bundled SmolLM2-135M), tiny, or a model folder")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing medians")
    p.add_argument("--batch-size", type=int, default=8, help="per GPU in the 2-GPU runs (1 GPU: twice this)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-samples", type=int, default=480, help="rounded down to a multiple of 2 x batch size")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--modes", default="1gpu,ddp,fsdp", help="comma list of 1gpu, ddp, fsdp")
    p.add_argument("--fused-kernels", default="auto", choices=("auto", "on", "off"),
                   help="passed to every run (auto: patch_model + bf16 frozen base on CUDA at bf16, on each rank too)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of this script on gloo")
    p.add_argument("--out", default=None, help="folder for the run folders and results.json (default: a temp dir)")
    return p.parse_args()


def model_dir(name: str, root: Path) -> Path:
    """Resolve the model once here, so the two ranks never convert or build it at the same time."""
    if name == "smollm2":
        from peftkit.data.assets import smollm2_dir

        return smollm2_dir()
    if name == "tiny":
        return tiny_llama(root / "tiny-llama")
    return Path(name)


def tiny_llama(folder: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftkit.data.assets import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def command(run: str, args: argparse.Namespace, model: Path, out: Path) -> tuple[list[str], dict]:
    mode = RUNS[run]
    batch = args.batch_size if mode else 2 * args.batch_size
    samples = args.train_samples // (2 * args.batch_size) * (2 * args.batch_size)
    cli = ["train", "--task", "causal-lm", "--model", str(model), "--output-dir", str(out),
           "--max-train-samples", str(samples),
           "--max-steps", str(args.steps), "--eval-steps", str(args.steps), "--batch-size", str(batch),
           "--gradient-accumulation-steps", str(args.grad_accum), "--max-length", str(args.max_length),
           "--precision", args.precision, "--num-samples", "1", "--max-new-tokens", "16",
           "--device", args.device, "--fused-kernels", args.fused_kernels, "--no-progress-bar", "--no-tensorboard"]
    env = dict(os.environ)
    if mode is None:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        return [sys.executable, "-m", "peftkit.cli.main", *cli], env
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*launcher, "-m", "peftkit.cli.main", *cli, "--distributed", mode], env


def measure(out: Path, warmup: int) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    elapsed = [r["elapsed_s"] for r in train]
    step_s = [b - a for a, b in zip(elapsed, elapsed[1:])][warmup:]
    summary = json.loads((out / "summary.json").read_text())
    ranks = summary.get("ranks") or [{"rank": 0, "peak_memory_bytes": summary["peak_memory_bytes"]}]
    return {"step_s": statistics.median(step_s) if step_s else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[warmup:]) if train[warmup:] else None,
            "peak_gib_per_rank": [round(r["peak_memory_bytes"] / 2**30, 3) for r in ranks],
            "loss_curve": [r["loss"] for r in train], "eval_after": summary["after_metrics"],
            "fused_kernels": summary.get("fused_kernels")}


def report(results: dict) -> None:
    base = results.get("1gpu", {}).get("loss_curve")
    print(f"\n{'run':<6} {'step ms':>9} {'tokens/s':>10} {'peak GiB per rank':<22} {'final loss':>10} {'max |dloss| vs 1gpu':>20}")
    for run, r in results.items():
        diff = max(abs(a - b) for a, b in zip(r["loss_curve"], base)) if base else float("nan")
        step = f"{1000 * r['step_s']:.1f}" if r["step_s"] else "-"
        tok = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(f"{run:<6} {step:>9} {tok:>10} {str(r['peak_gib_per_rank']):<22} {r['loss_curve'][-1]:>10.4f} {diff:>20.2e}"
              f"  fused: {r['fused_kernels']}")
    if base:
        print("\nloss per step (1gpu | " + " | ".join(k for k in results if k != "1gpu") + "):")
        for i, value in enumerate(base):
            others = " | ".join(f"{results[k]['loss_curve'][i]:.4f}" for k in results if k != "1gpu")
            print(f"  {i + 1:>4}  {value:.4f} | {others}")


def main() -> int:
    args = parse()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 visible GPUs, found {torch.cuda.device_count()}; run it on a 2-GPU machine")
    root = Path(args.out or tempfile.mkdtemp(prefix="peftkit-dist-"))
    root.mkdir(parents=True, exist_ok=True)
    model, results = model_dir(args.model, root), {}
    for run in args.modes.split(","):
        out = root / run
        cmd, env = command(run, args, model, out)
        print(f"[{run}] {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-4000:], sep="\n")
            sys.exit(f"[{run}] failed with exit code {done.returncode}")
        results[run] = measure(out, args.warmup)
    (root / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    report(results)
    print(f"\nrun folders and results.json: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
