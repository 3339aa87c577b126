"""TrainingArguments.cuda_graphs: what is refused, the eager / record / replay order per batch shape
(with stand-ins for the CUDA graph API on CPU), and, on a CUDA machine, that a graphed run trains
exactly as the eager one does."""
import contextlib
from pathlib import Path
import warnings

import pytest
import torch

from peftkit import AdaLoraConfig, LoraConfig, get_peft_model
from peftkit.kernels import patch_model
from peftkit.train import Trainer, TrainingArguments, graphed
from peftkit.train.metrics import read_metrics
from tiny_models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama(**config):
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(seed=0), LoraConfig(**{**dict(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                     task_type="CAUSAL_LM",
                                                                     init_lora_weights="gaussian"), **config}))


def lm_examples(n=16, lengths=(10,), seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 64, (lengths[i % len(lengths)],), generator=g)
        ids[1::2] = ids[0::2][: len(ids[1::2])]  # every odd token repeats the one before it: learnable
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kw, match", [
    (dict(precision="fp16"), "does not support precision='fp16'"),
    (dict(optim="paged_adamw_32bit"), "needs optim='adamw_torch'"),
])
def test_arguments_refuse_what_a_graph_cannot_hold(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainingArguments(cuda_graphs=True, **kw)


def test_a_cpu_run_is_refused_before_training_and_names_the_fix():
    args = TrainingArguments(cuda_graphs=True, device="cpu", progress_bar=False, tensorboard=False)
    with pytest.raises(ValueError, match="needs a CUDA device.*cuda_graphs=False"):
        Trainer(lora_llama(), args, lm_examples())


def test_methods_with_after_step_hooks_are_refused_by_name():
    config = AdaLoraConfig(target_modules=["q_proj", "v_proj"], total_step=10, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(seed=0), config)
    assert model.adapters_with_step_hooks() == ["default"]
    with pytest.raises(ValueError, match=r"after-step hooks of adapter\(s\) \['default'\]"):
        graphed.check_supported(torch.device("cuda"), False, model)
    assert lora_llama().adapters_with_step_hooks() == []
    graphed.check_supported(torch.device("cuda"), False, lora_llama())  # LoRA: nothing to refuse


def test_a_plain_model_with_its_own_after_step_hook_and_torchrun_are_refused():
    class Hooked(torch.nn.Linear):
        def after_optimizer_step(self, step):
            pass

    with pytest.raises(ValueError, match="cannot call Hooked.after_optimizer_step"):
        graphed.check_supported(torch.device("cuda"), False, Hooked(2, 2))
    with pytest.raises(ValueError, match="runs in one process"):
        graphed.check_supported(torch.device("cuda"), True, torch.nn.Linear(2, 2))


def test_prepare_optimizer_makes_adamw_capturable_with_a_tensor_rate_that_the_schedule_fills():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    graphed.prepare_optimizer(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["capturable"] and isinstance(lr, torch.Tensor)
    with warnings.catch_warnings():  # capturable AdamW cannot step on CPU: the schedule alone is stepped here
        warnings.simplefilter("ignore")
        sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.05)  # filled in place
    graphed.plain_learning_rates(opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and not isinstance(opt.param_groups[0]["lr"], torch.Tensor)


# ---------------------------------------------------------------- eager / record / replay, on CPU
class _FakeCuda:
    """torch.cuda's graph API as stand-ins: 'recording' runs the step once (as the real capture would
    not, so the step used here is a pure function), and a replay recomputes it from the recorded
    buffers into the recorded outputs."""

    def __init__(self, monkeypatch, step):
        self.events, self.step, self.steps = [], step, None
        fake = self

        class Graph:
            def replay(self):
                fake.events.append("replay")
                rec = next(r for r in fake.steps.recorded.values() if r.graph is self)
                rec.out.copy_(torch.stack([t.float() for t in step(rec.batches, rec.weights)]))

            def pool(self):
                return "pool"

        @contextlib.contextmanager
        def record(graph, pool=None, stream=None):
            fake.events.append(f"record(pool={pool})")
            yield

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        for name, value in dict(CUDAGraph=Graph, graph=record, Stream=Stream, stream=lambda s: contextlib.nullcontext(),
                                current_stream=lambda device=None: Stream(), synchronize=lambda device=None: None,
                                empty_cache=lambda: None).items():
            monkeypatch.setattr(torch.cuda, name, value)


def _batch(length, value):
    return [{"input_ids": torch.full((2, length), value), "use_cache": False}]


def test_each_shape_runs_eagerly_first_then_is_recorded_then_replayed_with_new_inputs(monkeypatch):
    calls = []

    def step(batches, weights):
        calls.append(batches[0]["input_ids"].shape[1])
        return (batches[0]["input_ids"].float().sum() * weights[0]).reshape(()), torch.tensor(float(len(calls)))

    fake = _FakeCuda(monkeypatch, step)
    steps = fake.steps = graphed.GraphedSteps(step, torch.device("cpu"))
    assert steps.run(_batch(4, 1), [1.0]).read()[0] == 8.0 and fake.events == []        # first sight: eager
    assert steps.run(_batch(4, 2), [0.5]).read()[0] == 8.0                              # recorded, replayed once
    assert fake.events == ["record(pool=None)", "replay"]
    assert steps.run(_batch(4, 3), [1.0]).read()[0] == 24.0                             # replayed on the new batch
    assert steps.run(_batch(6, 1), [1.0]).read()[0] == 12.0 and fake.events[-1] == "replay"  # a new shape: eager
    steps.run(_batch(6, 1), [1.0])
    assert fake.events[-2:] == ["record(pool=pool)", "replay"]                   # into the shared pool
    assert len(steps.recorded) == 2
    assert steps.run([{"input_ids": torch.ones(2, 4), "use_cache": True}], [1.0]).read()[0] == 8.0
    assert fake.events[-1] == "replay" and len(steps.recorded) == 2  # a non-tensor value is part of the shape
    assert steps.replays == 3


def test_an_all_ones_mask_is_dropped_on_the_host_for_models_that_read_none_as_all_ones():
    ids = torch.ones(2, 4, dtype=torch.long)
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert sorted(graphed.without_full_mask(full)) == ["input_ids"]
    assert graphed.without_full_mask(padded) is padded
    assert graphed.mask_is_optional(lora_llama()) and graphed.mask_is_optional(tiny_llama())
    patched = lora_llama()
    assert patch_model(patched).causal_lm_loss  # its forward is now a wrapper without named arguments
    assert graphed.mask_is_optional(patched)

    class Strict(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return input_ids

    assert not graphed.mask_is_optional(Strict()) and not graphed.mask_is_optional(torch.nn.Linear(2, 2))


def test_past_the_shape_limit_new_shapes_stay_eager_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(graphed, "MAX_SHAPES", 2)

    def step(batches, weights):
        return batches[0]["input_ids"].float().sum().reshape(()), torch.tensor(0.0)

    fake = _FakeCuda(monkeypatch, step)
    steps = fake.steps = graphed.GraphedSteps(step, torch.device("cpu"))
    with caplog.at_level("WARNING"):
        for length in (1, 2, 3, 3, 4, 3):
            steps.run(_batch(length, 1), [1.0])
    assert steps.seen == {graphed.shape_key(_batch(n, 1)) for n in (1, 2)}
    assert steps.recorded == {} and fake.events == []
    assert sum("more than 2 shapes" in r.message for r in caplog.records) == 1


# --------------------------------------------------------------------------------- on a CUDA GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _cuda_args(tmp_path, **kw):
    return TrainingArguments(**{**dict(progress_bar=False, tensorboard=False, device="cuda", task="causal-lm",
                                       precision="bf16", learning_rate=5e-3, batch_size=4, max_steps=8,
                                       lr_scheduler="linear", warmup_steps=2, max_grad_norm=0.5,
                                       output_dir=str(tmp_path)), **kw})


def _adapter(model):
    return {k: v.detach().float().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def _train_losses(folder):
    return [r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]


def two_shape_collate(features):
    """Rows cut to 6 or 10 tokens by a property of the batch: two batch shapes in a seeded order."""
    batch = torch.utils.data.default_collate(features)
    cut = 6 if int(batch["input_ids"][:, 0].sum()) % 2 else 10
    return {k: v[:, :cut] for k, v in batch.items()}


@cuda
@pytest.mark.parametrize("kw", [dict(), dict(gradient_accumulation_steps=2), dict(gradient_checkpointing=True)],
                         ids=["plain", "accumulation", "checkpointing"])
def test_graphed_training_matches_eager_training(kw, tmp_path):
    data = lm_examples(64, lengths=(10,))
    runs = {}
    for graphs in (False, True):
        model = lora_llama()
        trainer = Trainer(model, _cuda_args(tmp_path / str(graphs), cuda_graphs=graphs, max_steps=12, **kw), data,
                          collate_fn=two_shape_collate)
        trainer.train()
        runs[graphs] = trainer, _adapter(model), _train_losses(tmp_path / str(graphs))
    steps = runs[True][0].graphs
    assert steps.replays >= 4 and len(steps.recorded) >= 1, (steps.replays, len(steps.recorded))
    if not kw:
        assert len(steps.recorded) == 2  # both shapes were recorded and replayed
    assert len(runs[True][2]) == 12
    torch.testing.assert_close(torch.tensor(runs[True][2]), torch.tensor(runs[False][2]), rtol=1e-4, atol=1e-5)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-4, atol=1e-6, msg=key)


@cuda
def test_graphed_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    import shutil

    data = lm_examples(32, lengths=(10,))
    whole = lora_llama()
    trainer = Trainer(whole, _cuda_args(tmp_path / "whole", cuda_graphs=True, save_steps=4, save_total_limit=2,
                                        eval_steps=3), data, eval_dataset=data[:8])
    trainer.train()  # evaluations (eager, no grad) between the replays
    assert trainer.graphs.replays == 7 and "eval_loss" in read_metrics(tmp_path / "whole" / "metrics.jsonl")[-1]
    step_4 = Path("checkpoints") / "step-00000004"
    shutil.copytree(tmp_path / "whole" / step_4, tmp_path / "cut" / step_4)
    resumed = lora_llama()
    Trainer(resumed, _cuda_args(tmp_path / "cut", cuda_graphs=True, save_steps=4), data).train(resume_from=True)
    for key, value in _adapter(whole).items():
        torch.testing.assert_close(_adapter(resumed)[key], value, rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------- the loop: a step's numbers read after the next is issued
def test_reads_deferred_by_one_step_log_evaluate_and_checkpoint_as_the_plain_loop_does(monkeypatch, tmp_path):
    def run(folder, defer):
        events = []
        if defer:  # the graphed path's shape: a Pending result, read whenever the loop chooses
            real = Trainer._optimizer_step

            class Logged(graphed.Pending):
                def read(self):
                    events.append(("read", self.step))
                    return super().read()

            def deferred(self, batches):
                loss, tokens, norm = real(self, batches)
                events.append(("issue", self.state["global_step"]))
                pending = Logged(torch.tensor([loss, norm], dtype=torch.float64))
                pending.step = self.state["global_step"]
                return pending, tokens, None

            monkeypatch.setattr(Trainer, "_optimizer_step", deferred)
        args = TrainingArguments(progress_bar=False, tensorboard=False, device="cpu", task="causal-lm",
                                 learning_rate=5e-3, batch_size=4, max_steps=8, eval_steps=3, save_steps=3,
                                 save_total_limit=5, lr_scheduler="linear", warmup_steps=2, output_dir=str(folder))
        Trainer(lora_llama(), args, lm_examples(), lm_examples(8)).train()
        monkeypatch.undo()
        records = [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}
                   for r in read_metrics(folder / "metrics.jsonl")]
        return records, sorted(p.name for p in (folder / "checkpoints").iterdir()), events

    plain, plain_ckpts, _ = run(tmp_path / "plain", False)
    deferred, deferred_ckpts, events = run(tmp_path / "deferred", True)
    assert deferred == plain and deferred_ckpts == plain_ckpts
    issued = [s for e, s in events if e == "issue"]
    read_at = {s: i for i, (e, s) in enumerate(events) if e == "read"}
    assert issued == list(range(1, 9)) and sorted(read_at) == issued
    for step in issued:  # steps 3, 6 (evaluate + save) and 8 (the end) are read at once, the others one step late
        later = events.index(("issue", step + 1)) if step < 8 else len(events)
        assert (read_at[step] < later) == (step in (3, 6, 8)), (step, events)
