"""``peftkit train``: fine-tune a model with a PEFT method and save a complete run folder.

With no arguments it trains LoRA on the bundled MiniLM encoder and review-sentiment data. Options
come from ``--config FILE`` (YAML, see ``runconfig.py``) and flags, flags winning; every field of the
chosen method's config is a flag (``peftkit train --method NAME --help`` lists them).

Everything the user gave is checked (files, columns, labels, model folder, options) before the run
folder is created. The folder then gets ``config.yaml`` first, checkpoints while training, and the
finished files last, each written atomically:

    RUN/adapter/              PeftModel.from_pretrained(base, "RUN/adapter")
    RUN/config.yaml           peftkit train --config RUN/config.yaml  reruns it
    RUN/metrics.jsonl         one JSON object per logged step / evaluation
    RUN/training_curves.png   loss and held-out accuracy (or perplexity)
    RUN/summary.json          task, method, metric, before, after, params, time, memory, fused kernels

Launched by ``torchrun --nproc-per-node N -m peftkit.cli.main train ...`` every rank runs this job
on its data shard (``peftkit.train.distributed``); only rank 0 prints and writes the run folder.
``peftkit train --resume RUN`` continues a killed run as configured; it takes ``--batch-size`` and
``--gradient-accumulation-steps`` to split the global batch otherwise (another number of GPUs, less
memory), and records the new split in ``RUN/config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import yaml

from peftkit.data.packing import PackedDataset, check_packing_support, is_packed
from peftkit.train import Trainer, distributed, seed_everything
from peftkit.train.checkpoint import atomic_dir, atomic_write_text, list_checkpoints

from . import common
from .errors import UserError, did_you_mean
from .options import add_dataclass_flags, flag_name, load_yaml
from .parser import Parser
from .runconfig import METHOD_SKIP, TRAINING_SKIP, DataOptions, RunConfig, RunOptions, resolve
from .runconfig import TrainingArguments

SUMMARY = "summary.json"
# Flags --resume takes: another split of the same global batch (another world size, less memory);
# the checkpoint's data position counts examples, so the run continues where it stopped.
RESUME_FLAGS = ("batch_size", "gradient_accumulation_steps")
HELP = "fine-tune a model with a PEFT method (default: LoRA on the bundled MiniLM + review data)"


# ------------------------------------------------------------------------------------------ parsing
def build_parser(spec) -> argparse.ArgumentParser:
    parser = Parser(prog="peftkit train", description=HELP,
                    epilog="Flags override the --config file; `peftkit methods` lists the methods.")
    parser.add_argument("--config", metavar="FILE", help="YAML run config (e.g. a run folder's config.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a killed run from its last checkpoint (only --batch-size and "
                             "--gradient-accumulation-steps may change, splitting the global batch otherwise)")
    taken: set[str] = {"config", "resume"}
    add_dataclass_flags(parser.add_argument_group("run"), RunOptions, set(), taken)
    add_dataclass_flags(parser.add_argument_group("data"), DataOptions, set(), taken)
    add_dataclass_flags(parser.add_argument_group("training"), TrainingArguments, TRAINING_SKIP, taken)
    group = parser.add_argument_group(f"{spec.name} options")
    add_dataclass_flags(group, spec.config_cls, METHOD_SKIP, taken)
    return parser


def method_spec(name: str):
    from peftkit.registry import get_method, list_methods

    if name not in list_methods():
        raise UserError(f"unknown method {name!r}{did_you_mean(name, list_methods())}; "
                        f"available: {', '.join(list_methods())}")
    return get_method(name)


def parse(argv: list[str]) -> tuple[RunConfig, Path | None]:
    """Resolve flags + YAML into a RunConfig; also return the run folder for --resume."""
    pre = Parser(add_help=False)
    for flag in ("--config", "--method", "--resume"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    resume_dir = Path(known.resume) if known.resume else None
    yaml_doc = _resume_config(resume_dir, argv) if resume_dir else load_yaml(known.config) if known.config else {}
    spec = method_spec(known.method or yaml_doc.get("method") or "lora")
    flags = {k: v for k, v in vars(build_parser(spec).parse_args(argv)).items() if k not in ("config", "resume")}
    return resolve(flags, yaml_doc, spec), resume_dir


def _resume_config(run_dir: Path, argv: list[str]) -> dict:
    if not (run_dir / common.RUN_CONFIG).is_file():
        raise UserError(f"{str(run_dir)!r} is not a run folder (no {common.RUN_CONFIG}); pass --resume the folder of a run")
    allowed = ("--resume", "--no-progress-bar", *(flag_name(f) for f in RESUME_FLAGS))
    extra = [a for a in argv if a.startswith("--") and a.split("=")[0] not in allowed]
    if extra:
        raise UserError(f"--resume continues the run as configured; drop {' '.join(extra)} (it may change only "
                        f"{', '.join(flag_name(f) for f in RESUME_FLAGS)}, keeping the global batch)")
    return load_yaml(str(run_dir / common.RUN_CONFIG))


def _resume_changes_layout(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether --resume was given a batch split other than the run folder's config.yaml holds."""
    saved = load_yaml(str(run_dir / common.RUN_CONFIG)).get("training") or {}
    return any(saved.get(f) != getattr(cfg.training, f) for f in RESUME_FLAGS)


# ------------------------------------------------------------------------------------------ the job
@dataclasses.dataclass
class Job:
    cfg: RunConfig
    model_path: Path
    tokenizer: object
    data: common.Data
    model: object  # the PEFT-wrapped model


def prepare(cfg: RunConfig) -> Job:
    """Load and check everything the run needs; nothing is written yet."""
    task, seed = cfg.run.task, cfg.training.seed
    model_path = common.check_model_folder(cfg.run.model) if cfg.run.model else common.bundled_model_dir(task)
    tokenizer = common.load_tokenizer(model_path)
    data = common.build_data(task, tokenizer, cfg.data, seed, cuda_graphs=cfg.training.cuda_graphs)
    fill_run_length(cfg, len(data.train))
    seed_everything(seed)  # the classification head and the adapter start from the seed
    base = common.load_classifier(model_path, data.label2id) if task == "classification" else common.load_causal_lm(model_path)
    base = quantized_base(base, cfg)
    model = wrap(base, cfg)
    if is_packed(data.train):  # before the run folder exists; the Trainer checks the model again as it trains
        check_packing_support(model, data.train)
    return Job(cfg, model_path, tokenizer, data, model)


# Method options that, left unset, are the run's number of optimizer steps (AdaLoRA's schedule).
RUN_LENGTH_OPTIONS = ("total_step",)


def fill_run_length(cfg: RunConfig, n_train: int) -> None:
    """Set RUN_LENGTH_OPTIONS the user left unset from the run's planned steps (config.yaml too)."""
    steps = cfg.training.planned_steps(n_train, distributed.world_size())
    unset = {o: steps for o in RUN_LENGTH_OPTIONS
             if o in cfg.method_options and cfg.method_options[o] is None}
    if unset:
        try:
            cfg.method_config = dataclasses.replace(cfg.method_config, **unset)
        except ValueError as err:
            raise UserError(f"invalid {cfg.run.method} option: {' '.join(str(err).split())}") from None
        cfg.method_options.update(unset)


def quantized_base(base, cfg: RunConfig):
    """With --quantize: the base's linear layers in 4 bits (only LoRA has a layer for them). A base
    loaded from a 4-bit checkpoint is used as stored (--quantize changes nothing then)."""
    from peftkit.quant import is_quantized

    loaded_4bit = is_quantized(base)
    if cfg.run.quantize is None and not loaded_4bit:
        return base
    if cfg.run.method != "lora":
        why = "--model is a 4-bit checkpoint" if loaded_4bit else "--quantize quantizes the base to 4 bits"
        raise UserError(f"{why} (QLoRA); {cfg.run.method} has no 4-bit layer: use --method lora"
                        + ("" if loaded_4bit else ", or drop --quantize"))
    return common.quantize_base(base, cfg.to_yaml_dict())


def wrap(base, cfg: RunConfig):
    from peftkit import get_peft_model

    try:
        return get_peft_model(base, cfg.method_config)
    except ValueError as err:
        raise UserError(f"cannot apply {cfg.run.method} to the model: {' '.join(str(err).split())}") from None


def new_run_dir(cfg: RunConfig) -> Path:
    if cfg.run.output_dir:
        path = Path(cfg.run.output_dir)
        blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise UserError(f"--output-dir {str(path)!r} cannot be created: {str(blocked)!r} is a file; "
                            "choose a folder path")
        if path.exists() and any(path.iterdir()):
            raise UserError(f"output folder {str(path)!r} already exists and is not empty; choose a new "
                            f"--output-dir, or continue it with --resume {path}")
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{cfg.run.task}-{cfg.run.method}-{stamp}"
    n = 2
    while path.exists():
        path, n = Path("runs") / f"{cfg.run.task}-{cfg.run.method}-{stamp}-{n}", n + 1
    return path


def metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "loss"


def baseline(job: Job, trainer: Trainer, run_dir: Path) -> dict:
    """Held-out metrics (and samples) of the untrained adapter, cached for --resume."""
    path = run_dir / "checkpoints" / "baseline.json"
    try:
        cached = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:  # damaged: it is only a cache, so measure again
        cached = None
    if isinstance(cached, dict) and {"metrics", "samples"} <= set(cached):
        return cached
    result = {"metrics": trainer.evaluate(), "samples": samples(job, trainer)}
    trainer.log.write({"step": 0, **{f"eval_{k}": v for k, v in result["metrics"].items()}})  # plotted at step 0
    if trainer.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result))
    return result


def samples(job: Job, trainer: Trainer) -> list[str]:
    """Generated answers on rank 0 (under FSDP2 every rank generates: its forwards are collectives)."""
    fsdp = trainer.dist.mode == "fsdp"
    if job.cfg.run.task != "causal-lm" or not (trainer.is_main or fsdp):
        return []
    questions = [r["question"] for r in job.data.eval_records if "question" in r][: job.cfg.data.num_samples]
    with distributed.root_unsharded(job.model, trainer.dist):
        return common.generate_answers(job.model, job.tokenizer, questions, job.cfg.data.max_new_tokens,
                                       synced_gpus=fsdp)


def save_adapter(job: Job, trainer: Trainer, run_dir: Path) -> None:
    """Rank 0 writes the full adapter (gathered from the shards under FSDP2); the others wait."""
    with trainer.gathered_weights():
        if trainer.is_main:
            with atomic_dir(run_dir / "adapter") as tmp:
                job.model.save_pretrained(str(tmp))
                job.tokenizer.save_pretrained(str(tmp))
    distributed.barrier()


def write_config(cfg: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    header = "# peftkit run config: `peftkit train --config config.yaml` reruns it (null model/data = bundled)\n"
    atomic_write_text(run_dir / common.RUN_CONFIG, header + yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))


def summary(job: Job, before: dict, after: dict, result, after_samples: list[str]) -> dict:
    task, name = job.cfg.run.task, metric_name(job.cfg.run.task)
    trainable, total = job.model.get_nb_trainable_parameters()
    out = {"task": task, "method": job.cfg.run.method, "model": str(job.model_path), "metric": name,
           "before": before["metrics"][name], "after": after[name], "before_metrics": before["metrics"],
           "after_metrics": after, "trainable_params": trainable, "total_params": total,
           "train_seconds": round(result.train_seconds, 3), "peak_memory_bytes": result.peak_memory_bytes,
           "steps": result.global_step, "train_examples": len(job.data.train), "eval_examples": len(job.data.eval)}
    if isinstance(job.data.train, PackedDataset):  # train_examples counts rows, the trainer's examples
        out["packed_examples"] = job.data.train.n_examples
    if job.data.label2id is not None:
        out["labels"] = list(job.data.label2id)
    if task == "causal-lm":
        questions = [r["question"] for r in job.data.eval_records if "question" in r]
        out["samples"] = [{"question": q, "before": b, "after": a}
                          for q, b, a in zip(questions, before["samples"], after_samples)]
    return out


def train_size(train) -> str:
    if isinstance(train, PackedDataset):
        return f"{train.n_examples} training examples packed into {len(train)} rows"
    return f"{len(train)} training"


def report(line: str) -> None:
    if distributed.is_main_process():
        print(line, flush=True)


def show_metrics(label: str, metrics: dict) -> str:
    return f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def shared_run_dir(cfg: RunConfig) -> Path:
    """``new_run_dir`` decided by rank 0 (its name has a time stamp) and its answer sent to all ranks."""
    if distributed.world_size() == 1:
        return new_run_dir(cfg)
    answer = None
    if distributed.is_main_process():
        try:
            answer = (str(new_run_dir(cfg)), None)
        except UserError as err:
            answer = (None, str(err))
    path, error = distributed.broadcast_from_main(answer)
    if error is not None:
        raise UserError(error)  # on every rank, so none waits for the others
    return Path(path)


def report_layout(trainer: Trainer) -> None:
    d, a = trainer.dist, trainer.args
    if d.active:
        report(f"data parallel ({d.mode}) over {d.world_size} processes: global batch "
               f"{a.global_batch_size(d.world_size)} = {a.batch_size} per device x {d.world_size} x "
               f"{a.gradient_accumulation_steps} accumulation")


def per_rank(trainer: Trainer, result) -> list[dict] | None:
    """Each rank's peak memory and time (summary.json's ``ranks``) under torchrun; a collective."""
    if not trainer.dist.active:
        return None
    mine = {"rank": trainer.dist.rank, "device": str(trainer.device), "peak_memory_bytes": result.peak_memory_bytes,
            "train_seconds": round(result.train_seconds, 3)}
    return distributed.gather_objects(mine)


def run_job(cfg: RunConfig, resume_dir: Path | None) -> dict:
    run_dir = resume_dir or shared_run_dir(cfg)  # checked before the model and data load (not created yet)
    job = prepare(cfg)
    report(f"{cfg.run.task} with {cfg.run.method} on {job.model_path}: {train_size(job.data.train)}, "
           f"{len(job.data.eval)} held-out examples")
    if distributed.is_main_process():
        job.model.print_trainable_parameters()
    args = dataclasses.replace(cfg.training, output_dir=str(run_dir))
    trainer = Trainer(job.model, args, job.data.train, job.data.eval, job.data.collate)  # may refuse: no folder yet
    if resume_dir is None and distributed.is_main_process():
        write_config(cfg, run_dir)
    if resume_dir is not None and _resume_changes_layout(cfg, run_dir):
        trainer.check_resume(True)  # refuses, changing nothing, a split the checkpoint cannot continue
        if distributed.is_main_process():  # a later plain --resume goes on with the new split
            write_config(cfg, run_dir)
    report_layout(trainer)
    before = baseline(job, trainer, run_dir)
    report(show_metrics("held-out before", before["metrics"]))
    result = trainer.train(resume_from=resume_dir is not None)
    reuse = result.eval_metrics and result.global_step == trainer.total_steps and not cfg.training.load_best_at_end
    after = result.eval_metrics if reuse else trainer.evaluate()  # the last step was just evaluated
    after_samples = samples(job, trainer)
    save_adapter(job, trainer, run_dir)
    ranks = per_rank(trainer, result)
    if not trainer.is_main:
        return {}
    out = summary(job, before, after, result, after_samples)
    out["fused_kernels"] = str(trainer.patched) if trainer.patched else "off"  # what --fused-kernels did
    if ranks:
        out["ranks"] = ranks
    atomic_write_text(run_dir / SUMMARY, json.dumps(out, indent=2) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    print_outcome(out, run_dir)
    return out


def print_outcome(out: dict, run_dir: Path) -> None:
    report(show_metrics("held-out after ", out["after_metrics"]))
    report(f"held-out {out['metric']}: {out['before']:.4f} -> {out['after']:.4f} "
           f"({out['steps']} steps, {out['train_seconds']:.1f} s)")
    for sample in out.get("samples", []):
        report(f"  Q: {sample['question']}\n    before: {sample['before']}\n    after:  {sample['after']}")
    report(f"run folder: {run_dir}")


def check_has_checkpoint(run_dir: Path) -> None:
    """--resume of a run that stopped before its first checkpoint: refuse, before loading anything."""
    if not list_checkpoints(run_dir / "checkpoints"):
        raise UserError(f"{str(run_dir)!r} holds no checkpoint to resume from (the run stopped before its first "
                        f"save); drop --resume and start it again: peftkit train --config "
                        f"{run_dir / common.RUN_CONFIG} (a new run folder; delete {str(run_dir)!r} if unwanted)")


def run(argv: list[str]) -> int:
    cfg, resume_dir = parse(argv)
    if resume_dir is not None and (resume_dir / SUMMARY).is_file():
        report(f"{resume_dir} already finished; its results are in {resume_dir / SUMMARY}")
        return 0
    if resume_dir is not None:
        check_has_checkpoint(resume_dir)
    with distributed.distributed_session(cfg.training.device) as rank_device:
        run_job(cfg, resume_dir)
    if rank_device is not None:  # a torchrun rank: leave before finalization can abort it
        distributed.exit_without_finalizing(0)
    return 0
