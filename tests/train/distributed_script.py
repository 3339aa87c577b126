"""Run under torchrun by test_distributed.py: train a dist_cases case on every rank, save what rank 0 sees.

usage: torchrun --standalone --nproc-per-node N distributed_script.py CASE MODE OUT [SECONDS_PER_STEP] [resume] [bf16-best|fp32-fused|bf16-fused]

``bf16-best``: bf16 mixed precision and load_best_at_end. ``fp32-fused`` / ``bf16-fused``:
fused_kernels='on' (patch_model; in bf16 also a bf16 frozen base, as fused_kernels='auto' does on CUDA).

Rank 0 writes OUT/result.json (eval metrics), OUT/probe.pt (the trained model's logits on
dist_cases.PROBE) and OUT/adapter/ (save_pretrained, gathered under FSDP2).
"""

import json
import sys
import time
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).parent))
import dist_cases  # noqa: E402

from peftkit.train import Trainer  # noqa: E402
from peftkit.train.checkpoint import trainable_state  # noqa: E402
from peftkit.train.distributed import distributed_session, exit_without_finalizing, world_size  # noqa: E402

torch.set_num_threads(1)
case, mode, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
resume = "resume" in sys.argv[5:]
extra = dict(precision="bf16", load_best_at_end=True) if "bf16-best" in sys.argv[5:] else {}
for precision in ("fp32", "bf16"):
    if f"{precision}-fused" in sys.argv[5:]:
        extra = dict(precision=precision, fused_kernels="on")


def slowed(model):
    """Sleep before each forward so the test can SIGKILL the job between checkpoints."""
    model.register_forward_pre_hook(lambda *_: time.sleep(delay))
    return model


with distributed_session("cpu") as rank_device:
    model = slowed(dist_cases.model(case)) if delay else dist_cases.model(case)
    train, held_out = dist_cases.data(case)
    args = dist_cases.args(case, str(out), world_size(), distributed=mode, **extra)
    trainer = Trainer(model, args, train, held_out)
    trainer.train(resume_from=resume)
    metrics = trainer.evaluate()
    with torch.no_grad():
        model.eval()
        probe = model(input_ids=dist_cases.PROBE).logits
    with trainer.gathered_weights():
        if trainer.is_main:
            model.save_pretrained(str(out / "adapter"))
            torch.save({"trainable": trainable_state(model), "probe": probe}, out / "probe.pt")
            fsdp_units = sum(isinstance(m, FSDPModule) for m in model.modules())
            (out / "result.json").write_text(json.dumps({"metrics": metrics, "fsdp_units": fsdp_units,
                                                         "patched": str(trainer.patched or "")}))
if rank_device is not None:  # as `peftkit train` leaves a torchrun rank
    exit_without_finalizing(0)
