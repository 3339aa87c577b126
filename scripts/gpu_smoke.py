"""GPU smoke run of the trainer and CLI: a tiny BERT classifier and a tiny Llama LM, built here
with a word-level tokenizer (no downloads), trained through `peftkit train` on the GPU in bf16 and
fp16 with fused AdamW, then evaluated, merged and resumed. Prints one line per check.

    PYTHONPATH=src python3 scripts/gpu_smoke.py OUT_DIR
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]")


def make_assets(root: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    words = [f"w{i}" for i in range(60)] + ["good", "bad"]
    tok = tokenizer(words)
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(words) + 4, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128, num_labels=2))
    bert.save_pretrained(root / "bert"), tok.save_pretrained(root / "bert")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(words) + 4, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(root / "llama"), tok.save_pretrained(root / "llama")
    rng = random.Random(0)
    rows = []
    for _ in range(600):
        label = rng.choice(["good", "bad"])
        text = " ".join(rng.choice(words[:60]) for _ in range(6)) + f" {label}"
        rows.append({"text": text, "label": label})
    (root / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "lm.txt").write_text("\n".join(" ".join(f"w{(i + k) % 60}" for k in range(12)) for i in range(400)))


def peftkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit.cli.main", *args], capture_output=True, text=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    return ok


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    make_assets(out)
    results = []
    for precision in ("bf16", "fp16"):
        run = out / f"cls-{precision}"
        done = peftkit("train", "--model", str(out / "bert"), "--data", str(out / "cls.jsonl"), "--max-steps", "200", "--learning-rate", "1e-2",
                       "--precision", precision, "--output-dir", str(run), "--no-progress-bar")
        summary = json.loads((run / "summary.json").read_text()) if done.returncode == 0 else {}
        results.append(check(f"classification {precision} on {DEVICE}", done.returncode == 0 and summary.get("after", 0) > 0.9,
                             f"acc {summary.get('before')} -> {summary.get('after')}, peak {summary.get('peak_memory_bytes')} B"
                             + (done.stderr[-800:] if done.returncode else "")))
    run = out / "lm"
    done = peftkit("train", "--task", "causal-lm", "--model", str(out / "llama"), "--data", str(out / "lm.txt"),
                   "--max-steps", "40", "--precision", "bf16", "--gradient-checkpointing", "--output-dir", str(run),
                   "--no-progress-bar")
    summary = json.loads((run / "summary.json").read_text()) if done.returncode == 0 else {}
    results.append(check(f"causal-lm bf16 + checkpointing on {DEVICE}", done.returncode == 0 and summary.get("after", 9e9) < summary.get("before", 0),
                         f"loss {summary.get('before')} -> {summary.get('after')}" + (done.stderr[-800:] if done.returncode else "")))
    evald = peftkit("eval", str(out / "cls-bf16"))
    results.append(check(f"eval reproduces the run on {DEVICE}", evald.returncode == 0, evald.stdout[-200:] + evald.stderr[-400:]))
    merged = peftkit("merge", str(out / "cls-bf16"), "-o", str(out / "merged"))
    results.append(check(f"merge on {DEVICE}", merged.returncode == 0, merged.stderr[-400:]))
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/peftkit-gpu-smoke")))
