"""Opt-in: record a whole training step once as a CUDA graph, then replay it.

A LoRA step of a 1B Llama issues a few thousand kernels; issuing them from Python takes about as
long as the GPU needs to run them, so the GPU waits between kernels (run 3: busy 93 of 112 ms).
A replayed graph issues them all with one call.

    step = graph_train_step(lambda batch: train_step(model, opt, batch), batch, optimizers=[opt])
    for batch in loader:
        loss = step(batch)        # copies batch into the recorded inputs, replays; loss is reused

What the step must satisfy (CUDA graphs' own rules):
  * no host-device synchronisation inside (.item(), boolean-mask indexing, nonzero, printing a
    tensor); the capture fails with a CUDA error if there is one
  * every call gets tensors of the recorded shapes and dtypes, and its Python control flow does
    not depend on their values; non-tensor leaves are ignored after the capture
  * gradients are None when it starts and it leaves them None (zero_grad(set_to_none=True) at
    its end): gradients then live only inside the graph and are not accumulated across replays
  * the optimizer's hyper-parameters are fixed, or tensors changed in place (a float learning
    rate is baked into the graph); Adam-style optimizers are switched to capturable=True here,
    which must happen before their first step
The `warmup` eager steps before the capture are real steps: they update the weights.
Tensors the step returns are overwritten by the next replay: clone what must be kept.
Without CUDA tensors in the example inputs the step is returned as it is (the eager twin).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.utils import _pytree as pytree


def graph_train_step(step: Callable[..., Any], *example_args: Any, optimizers: Iterable = (),
                     warmup: int = 3) -> Callable[..., Any]:
    """Return a function that runs `step(*args)` by replaying a CUDA graph recorded on `example_args`."""
    optimizers = list(optimizers)
    static = [t.clone() if isinstance(t, torch.Tensor) else t for t in pytree.tree_leaves(example_args)]
    if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in static):
        return step
    for opt in optimizers:
        make_capturable(opt)
    static_args = pytree.tree_unflatten(static, pytree.tree_structure(example_args))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
            step(*static_args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph gets its own pool
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static_args)
    return replayer(graph, static, out)


def replayer(graph, static: list, out: Any) -> Callable[..., Any]:
    """The replay function: copy each tensor argument into its recorded buffer, replay, return `out`."""
    def replay(*args: Any) -> Any:
        leaves = pytree.tree_leaves(args)
        if len(leaves) != len(static):
            raise ValueError(f"the graphed step was recorded with {len(static)} argument leaves, "
                             f"got {len(leaves)}: call it with the same structure as the example")
        for buffer, new in zip(static, leaves):
            if isinstance(buffer, torch.Tensor) and new is not buffer:
                buffer.copy_(new)
        graph.replay()
        return out

    return replay


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Set capturable=True where a param group has the option (Adam, AdamW, ...); SGD needs none."""
    for group in optimizer.param_groups:
        if "capturable" not in group or group["capturable"]:
            continue
        if not group.get("fused") and any(optimizer.state.get(p) for p in group["params"]):
            raise ValueError(f"{type(optimizer).__name__} has already stepped with capturable=False (its step "
                             "counters are on the CPU); build the graphed step before the first optimizer step")
        group["capturable"] = True
