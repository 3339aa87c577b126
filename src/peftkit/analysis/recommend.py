"""Rank fine-tuning methods for a user's constraints, from the params and memory estimates.

Every candidate (full fine-tuning, each registered method, and each method over a 4-bit NF4 base)
is estimated on the model skeleton; nothing is looked up. The score adds up terms, each of which
also writes the reason shown to the user:

    does not fit      estimated total > ``headroom`` x GPU memory: ranked after everything that fits
    capacity          -|log10(trainable params) - log10(training tokens)|: as many trainable
                      parameters as training tokens is the target, far fewer underfits a large
                      data set, far more overfits a small one
    4-bit base        -1 when the same method fits unquantized (NF4 costs accuracy and step time);
                      no penalty when it is what makes the method fit
    merge             with ``need_merge``: -4 for methods that cannot fold into the weights (they
                      add inference latency); mergeable ones say so
    multi-adapter     with ``multi_adapter``: -3 for full fine-tuning (a whole model copy per task),
                      -2 for methods that cannot serve several adapters in one batch
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .memory import GIB, MemoryEstimate, MemoryOptions, adapts_4bit, full_finetune, with_method
from .shapes import ModelSource


@dataclass
class Constraints:
    gpu_memory_gib: float = field(metadata={"help": "memory of the GPU to train on, in GiB"})
    data_size: int = field(default=10_000, metadata={"help": "training examples"})
    need_merge: bool = field(default=False, metadata={"help": "serve merged weights: zero added inference latency"})
    multi_adapter: bool = field(default=False, metadata={"help": "serve many task adapters over one base model"})
    headroom: float = field(default=0.9, metadata={"help": "share of GPU memory a plan may use (CUDA context, fragmentation)"})

    def __post_init__(self) -> None:
        if not self.gpu_memory_gib > 0:
            raise ValueError(f"gpu_memory_gib must be > 0 (GiB), got {self.gpu_memory_gib!r}")
        if self.data_size < 1:
            raise ValueError(f"data_size must be >= 1 training example, got {self.data_size!r}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom!r}")


@dataclass
class Candidate:
    method: str  # "full" or a registered method name
    estimate: MemoryEstimate
    mixed_batches: bool  # several adapters can serve rows of one batch
    fits: bool = False
    score: float = 0.0
    reasons: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """``full``, the method's name, or ``q`` + the name over a 4-bit base (``qlora``)."""
        return self.estimate.regime

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "four_bit_base": self.estimate.four_bit,
                "fits": self.fits, "score": round(self.score, 3),
                "memory_gib": round(self.estimate.total / GIB, 2), "trainable_params": self.estimate.trainable,
                "reasons": self.reasons}


def candidates(src: ModelSource, configs: dict[str, object], opts: MemoryOptions) -> list[Candidate]:
    """Full fine-tuning plus every method in ``configs`` (name -> config), with and without a 4-bit base."""
    from peftkit.registry import get_method

    found = [Candidate("full", full_finetune(src, opts), mixed_batches=False)]
    for name, config in configs.items():
        spec = get_method(name)
        # input-level methods take the whole batch; a composite (MAM, UniPELT) is counted as one of them
        mixed = spec.prepare_inputs is None and spec.parts is None
        bases = (False, True) if adapts_4bit(spec, config) else (False,)
        found += [Candidate(name, with_method(src, config, opts, four_bit, name), mixed) for four_bit in bases]
    return found



def rank(found: list[Candidate], limits: Constraints, tokens: int, checkpointing: bool = False) -> list[Candidate]:
    budget = limits.headroom * limits.gpu_memory_gib * GIB
    plain = {c.method: c for c in found if not c.estimate.four_bit}
    for c in found:
        c.fits = c.estimate.total <= budget and _runs_as_planned(c, checkpointing)
        c.reasons = [_memory_reason(c, limits, checkpointing)]
        c.score = _capacity(c, tokens) + _quantization(c, plain.get(c.method), budget)
        c.score += _merge(c) if limits.need_merge else 0.0
        c.score += _multi(c) if limits.multi_adapter else 0.0
    return sorted(found, key=lambda c: (not c.fits, -c.score))


def _runs_as_planned(c: Candidate, checkpointing: bool) -> bool:
    from peftkit.registry import get_method

    return not checkpointing or c.method == "full" or get_method(c.method).supports_checkpointing


def _memory_reason(c: Candidate, limits: Constraints, checkpointing: bool) -> str:
    need, have = c.estimate.total / GIB, limits.headroom * limits.gpu_memory_gib
    if not _runs_as_planned(c, checkpointing):
        return "does not fit the plan: it cannot train under gradient checkpointing; plan it without"
    verdict = "fits" if c.fits else "does not fit"
    return f"{verdict}: needs about {need:.1f} GiB of {have:.1f} GiB usable ({limits.gpu_memory_gib:g} GiB GPU)"


def _capacity(c: Candidate, tokens: int) -> float:
    gap = math.log10(max(c.estimate.trainable, 1)) - math.log10(max(tokens, 1))
    if abs(gap) < 0.5:
        c.reasons.append(f"{c.estimate.trainable:,} trainable parameters suit {tokens:,} training tokens")
    elif gap > 0:
        c.reasons.append(f"{c.estimate.trainable:,} trainable parameters for only {tokens:,} training tokens "
                         "risks overfitting")
    else:
        c.reasons.append(f"{c.estimate.trainable:,} trainable parameters may underfit {tokens:,} training tokens")
    return -abs(gap)


def _quantization(c: Candidate, plain: Candidate | None, budget: float) -> float:
    if not c.estimate.four_bit or plain is None:
        return 0.0
    if plain.estimate.total <= budget:
        c.reasons.append(f"{plain.name} fits without quantizing the base; the 4-bit base costs accuracy and speed")
        return -1.0
    c.reasons.append(f"the 4-bit base is what makes it fit ({plain.name} on the unquantized base needs "
                     f"{plain.estimate.total / GIB:.1f} GiB)")
    return 0.0


def _merge(c: Candidate) -> float:
    if c.method == "full":
        c.reasons.append("a fully fine-tuned model serves with no adapter at all")
        return 0.0
    if not c.estimate.mergeable:
        c.reasons.append("cannot be merged into the weights, so it adds inference latency")
        return -4.0
    note = " (merge into a 16-bit copy of the base, not the 4-bit one)" if c.estimate.four_bit else ""
    c.reasons.append("merges into the base weights: zero added inference latency" + note)
    return 0.0


def _multi(c: Candidate) -> float:
    if c.method == "full":
        c.reasons.append("one full model copy per task: poor for serving many tasks")
        return -3.0
    if not c.mixed_batches:
        c.reasons.append("cannot serve different adapters in one batch")
        return -2.0
    c.reasons.append("many adapters share one base and mix in one batch")
    return 0.0


def recommend(src: ModelSource, configs: dict[str, object], opts: MemoryOptions, limits: Constraints) -> list[Candidate]:
    """Ranked candidates (best first; those that do not fit last), each with its reasons."""
    return rank(candidates(src, configs, opts), limits, limits.data_size * opts.seq_len, opts.gradient_checkpointing)
