"""Data parallelism under torchrun (2 ranks, gloo on CPU) against one process with the same global batch.

The 2-rank jobs run distributed_script.py through torchrun, as a user would launch them; the
one-process references train the same dist_cases case in this process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from . import dist_cases
from peftkit import PeftModel
from peftkit.train import Trainer, TrainingArguments, distributed
from peftkit.train.checkpoint import list_checkpoints, load_checkpoint, trainable_state
from peftkit.train.metrics import EvalAccumulator, read_metrics

from .conftest import TinyClassifier

SCRIPT = Path(__file__).parent / "distributed_script.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # an abort prints every thread's stack


def torchrun(case: str, mode: str, out: Path, *extra: str, timeout: float = 90) -> None:
    done = subprocess.run([*TORCHRUN, str(SCRIPT), case, mode, str(out), *extra], capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def single_process(case: str, out: Path | None = None, resume: bool = False) -> tuple[Trainer, dict]:
    """The reference: one process, batch 8 (= 2 ranks x 4), same seed, same data."""
    model = dist_cases.model(case)
    train, held_out = dist_cases.data(case)
    trainer = Trainer(model, dist_cases.args(case, str(out) if out else None, 1), train, held_out)
    trainer.train(resume_from=resume)
    return trainer, trainer.evaluate()


def assert_same_weights(got: dict, expected: dict, tol: float = 1e-6) -> None:
    assert got.keys() == expected.keys() and got
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=tol, rtol=0), name


def train_curve(out: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in read_metrics(out / "metrics.jsonl")]


CASES = {"ddp": "cls", "fsdp": "lm"}  # FSDP2 shards the Llama decoder layers


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """mode -> the folder of a finished 2-rank run (launched once per module, on first use)."""
    done: dict[str, Path] = {}

    def get(mode: str) -> Path:
        if mode not in done:
            done[mode] = tmp_path_factory.mktemp(mode) / "run"
            torchrun(CASES[mode], mode, done[mode])
        return done[mode]
    return get


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def job(request, uninterrupted):
    """(mode, case, run folder, rank 0's saved outputs and result, the one-process trainer and metrics)."""
    mode = request.param
    case, out = CASES[mode], uninterrupted(mode)
    trainer, metrics = single_process(case)
    saved = torch.load(out / "probe.pt")
    return mode, case, out, saved, json.loads((out / "result.json").read_text()), trainer, metrics


# ------------------------------------------------------------------------------------- (a), (b)
def test_two_ranks_give_the_weights_of_one_process_with_the_same_global_batch(job):
    mode, case, out, saved, result, reference, _ = job
    assert_same_weights(saved["trainable"], trainable_state(reference.model))
    expected = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in reference.log.records]
    for got, want in zip(train_curve(out), expected, strict=True):
        assert got[0] == want[0] and [v is None for v in got] == [v is None for v in want]
        assert [v for v in got[1:] if v is not None] == pytest.approx([v for v in want[1:] if v is not None], rel=1e-6)
    if mode == "fsdp":  # 2 decoder layers + the root were sharded, frozen base weights included
        assert result["fsdp_units"] == 3


# ------------------------------------------------------------------------------------------ (e)
def test_eval_metrics_sum_over_ranks_to_the_one_process_metrics(job):
    _, case, _, _, result, _, metrics = job
    assert result["metrics"].keys() == metrics.keys()
    for name, value in metrics.items():
        assert result["metrics"][name] == pytest.approx(value, rel=1e-6), name
    if case == "cls":  # counts, not floats: exactly equal
        assert (result["metrics"]["accuracy"], result["metrics"]["f1"]) == (metrics["accuracy"], metrics["f1"])


# ------------------------------------------------------------------------------------------ (d)
def test_only_rank_0_writes_the_run_folder(job):
    _, _, out, _, _, _, _ = job
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # two writers would log every step twice
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006"]
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


# ------------------------------------------------------------------------------ saved adapter
def test_adapter_saved_by_two_ranks_loads_in_one_process_with_the_same_outputs(job):
    _, case, out, saved, _, _, _ = job
    base = dist_cases.model(case).get_base_model()  # a fresh base: the adapter file is the only link
    loaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        logits = loaded(input_ids=dist_cases.PROBE).logits
    assert torch.allclose(logits, saved["probe"], atol=1e-5, rtol=0)


def test_fsdp_in_bf16_restores_and_saves_the_fp32_best_adapter(tmp_path):
    """After an evaluation FSDP2 leaves the root unsharded (bf16 copies); loading and saving must not see those."""
    out = tmp_path / "run"
    torchrun("lm", "fsdp", out, "0", "-", "bf16-best")
    best = load_checkpoint(out / "best")
    assert best["state"]["global_step"] < 6  # the last evaluation was not the best: the weights changed back
    saved = torch.load(out / "probe.pt")["trainable"]
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert_same_weights(saved, best["trainable"], tol=0.0)


def fused_run(mode: str, precision: str, tmp_path: Path) -> tuple[dict, dict, Trainer, dict]:
    """A 2-rank run and its one-process reference, both with fused_kernels='on' (patch_model applied on
    every rank before DDP / FSDP2 wrap the model): result.json, rank 0's trained adapters, the reference
    trainer and its starting adapters."""
    out = tmp_path / "run"
    torchrun("lm", mode, out, "0", "-", f"{precision}-fused")
    one = Trainer(dist_cases.model("lm"), dist_cases.args("lm", None, 1, precision=precision, fused_kernels="on"),
                  *dist_cases.data("lm"))
    start = trainable_state(one.model)
    one.train()
    result = json.loads((out / "result.json").read_text())
    assert one.patched is not None and result["patched"] == str(one.patched)
    return result, torch.load(out / "probe.pt")["trainable"], one, start


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_fused_kernels_under_torchrun_give_the_weights_of_one_process(tmp_path, mode):
    """fp32: the fused LoRA nodes read FSDP2's gathered weights and feed both wrappers' gradient reductions."""
    _, got, one, _ = fused_run(mode, "fp32", tmp_path)
    assert_same_weights(got, trainable_state(one.model), tol=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_fused_kernels_under_torchrun_in_bf16_train_as_one_process_does(tmp_path, mode):
    """bf16: the frozen base is cast before wrapping (FSDP2 then shards bf16 base weights beside fp32
    adapters). Ranks see other micro-batches than one process, so bf16 rounding differs: compare the
    adapters' total movement and the held-out loss, not single elements."""
    result, got, one, start = fused_run(mode, "bf16", tmp_path)
    assert {p.dtype for p in one.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    want = trainable_state(one.model)
    moved = sum((want[n] - start[n]).norm() ** 2 for n in want) ** 0.5
    apart = sum((got[n] - want[n]).norm() ** 2 for n in want) ** 0.5
    assert got.keys() == want.keys() and apart < 0.1 * moved, (apart, moved)
    assert result["metrics"]["loss"] == pytest.approx(one.evaluate()["loss"], rel=1e-2)


# ------------------------------------------------------------------------------------------ (c)
def kill_after(out: Path, steps: int, *extra: str) -> None:
    """Start a slowed 2-rank FSDP2 job and SIGKILL all of it once ``steps`` steps are logged."""
    proc = subprocess.Popen([*TORCHRUN, str(SCRIPT), "lm", "fsdp", str(out), "0.15", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if sum(1 for r in read_metrics(out / "metrics.jsonl") if "loss" in r) >= steps \
                if (out / "metrics.jsonl").exists() else False:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists(), "the job finished before it could be killed"


@pytest.fixture(scope="module")
def killed(tmp_path_factory, uninterrupted):
    """A 2-rank FSDP2 job SIGKILLed after step 2, in three copies, and the uninterrupted run's weights."""
    root = tmp_path_factory.mktemp("killed")
    kill_after(root / "fsdp", 2)
    assert list_checkpoints(root / "fsdp" / "checkpoints"), "killed before its first checkpoint: nothing to resume"
    for name in ("ddp", "one"):
        shutil.copytree(root / "fsdp", root / name)
    reference = uninterrupted("fsdp")
    return root, reference, torch.load(reference / "probe.pt")["trainable"]


def test_killed_job_resumes_to_the_uninterrupted_result(killed):
    root, reference, expected = killed
    torchrun("lm", "fsdp", root / "fsdp", "0", "resume")  # same world size, same strategy
    assert_same_weights(torch.load(root / "fsdp" / "probe.pt")["trainable"], expected)
    assert train_curve(root / "fsdp") == train_curve(reference)


def test_killed_job_resumes_under_ddp_or_in_one_process_to_the_same_result(killed):
    root, reference, expected = killed
    torchrun("lm", "ddp", root / "ddp", "0", "resume")  # the checkpoint is full: any strategy loads it
    assert_same_weights(torch.load(root / "ddp" / "probe.pt")["trainable"], expected)
    one, _ = single_process("lm", root / "one", resume=True)  # 1 process x batch 8
    assert_same_weights(trainable_state(one.model), expected)
    assert [s for s, *_ in train_curve(root / "one")] == [s for s, *_ in train_curve(reference)]


# ------------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_shards_follow_distributed_sampler(n, world):
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        assert distributed.shard(list(range(n)), rank, world) == list(sampler)


def test_shards_of_one_global_batch_are_the_one_process_batch():
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()
    shards = [distributed.shard(order, r, 2) for r in range(2)]
    for j in range(5):  # micro-batch j of both ranks (4 each) = batch j of one process (8)
        assert sorted(shards[0][4 * j: 4 * j + 4] + shards[1][4 * j: 4 * j + 4]) == sorted(order[8 * j: 8 * j + 8])


def test_eval_counts_of_two_shards_add_up_to_one_pass():
    g = torch.Generator().manual_seed(0)
    logits, labels, losses = torch.randn(11, 3, generator=g), torch.randint(0, 3, (11,), generator=g), torch.rand(11)
    whole, parts = EvalAccumulator("classification"), [EvalAccumulator("classification") for _ in range(2)]
    for i in range(11):
        whole.add(losses[i], 1, logits[i: i + 1], labels[i: i + 1])
        parts[i % 2].add(losses[i], 1, logits[i: i + 1], labels[i: i + 1])
    merged = EvalAccumulator("classification")
    merged.merge_counts([a + b for a, b in zip(parts[0].counts(3), parts[1].counts(3))], 3)
    assert merged.result() == pytest.approx(whole.result(), rel=1e-12)
    preds = logits.argmax(-1)
    assert whole.result()["accuracy"] == (preds == labels).float().mean().item()


def test_optimizer_state_keyed_by_name_round_trips_to_the_index_form(cls_data):
    model = TinyClassifier()
    model.net[0].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    model(cls_data[0]["x"][None], cls_data[0]["labels"][None])["loss"].backward()
    opt.step()
    named = distributed.named_optimizer_state(model, opt.state_dict())
    assert named["param_groups"][0]["params"] == ["net.0.bias", "net.3.weight", "net.3.bias"]
    back = distributed.indexed_optimizer_state(model, named)
    assert back["param_groups"] == opt.state_dict()["param_groups"]
    assert back["state"][1]["exp_avg"].equal(opt.state_dict()["state"][1]["exp_avg"])


def test_data_parallel_modes_without_a_process_group_say_to_use_torchrun(cls_data):
    for mode in ("ddp", "fsdp"):
        args = TrainingArguments(distributed=mode, device="cpu", progress_bar=False)
        with pytest.raises(ValueError, match="torchrun"):
            Trainer(TinyClassifier(), args, cls_data)


def test_torchrun_environment_without_a_process_group_is_an_error(cls_data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="distributed_session"):
        Trainer(TinyClassifier(), TrainingArguments(device="cpu"), cls_data)


def test_fsdp_with_fp16_is_refused_on_construction():
    with pytest.raises(ValueError, match="bf16"):
        TrainingArguments(distributed="fsdp", precision="fp16")
    with pytest.raises(ValueError, match="distributed must be one of"):
        TrainingArguments(distributed="deepspeed")


def test_single_process_steps_are_unchanged_by_the_world_size_argument():
    args = TrainingArguments(batch_size=4, gradient_accumulation_steps=2, epochs=2)
    assert args.steps_per_epoch(40) == 5 and args.planned_steps(40) == 10
    assert args.steps_per_epoch(40, world_size=2) == 3 and args.global_batch_size(2) == 16


def test_exit_without_finalizing_flushes_output_and_skips_interpreter_teardown():
    code = ("import atexit, logging, sys\n"
            "from peftkit.train.distributed import exit_without_finalizing\n"
            "atexit.register(lambda: print('finalized'))\n"
            "print('result', end='')\n"
            "logging.getLogger('peftkit').warning('logged')\n"
            "exit_without_finalizing(3)\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 3
    assert done.stdout == "result"  # flushed without a newline; no atexit handler, nothing after the exit
    assert "logged" in done.stderr
