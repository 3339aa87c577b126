"""Where an eager step waits for its host: forward, backward and optimizer, real batch.

    PYTHONPATH=src python benchmarks/step_phases_gpu.py [--shape 1b] [--contenders frozen,peftkit]

An eager step is as fast as its graphed twin only if the host issues each phase before the GPU
runs out of queued work. Per contender and phase this prints (ms per step, medians):

  host    time the host takes to issue the phase (perf_counter; the launch queue absorbs it
          without blocking unless it is full)
  gpu     the phase's span on the GPU's clock in the free-running loop (CUDA events between
          phases): its kernels plus any idle time waiting for the host
  busy    the same span when the GPU had a head start: a sleep kernel queued first, longer than
          the host needs for the phase, so its kernels are all queued before they can run; this
          is the phase's GPU time alone
  wait    gpu - busy: what the GPU lost waiting for the host in that phase

Timed loops do not synchronise between steps, as in train_throughput.py.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import train_throughput as tt

PHASES = ("forward", "backward", "optimizer")


def phased_step(model, opt, batch, events, host: list[float]):
    """One train_step with an event recorded after each phase, and the host's time per phase."""
    t = [time.perf_counter()]
    events[0].record()
    loss = model(**batch).loss
    events[1].record()
    t.append(time.perf_counter())
    loss.backward()
    events[2].record()
    t.append(time.perf_counter())
    step_optimizer(opt)
    events[3].record()
    t.append(time.perf_counter())
    host.extend(b - a for a, b in zip(t, t[1:]))
    return loss.detach()


def step_optimizer(opt) -> None:
    if opt is not None:  # the frozen ceiling has nothing to train
        opt.step()
        opt.zero_grad(set_to_none=True)


def free_running(model, opt, batch, steps: int) -> tuple[list[float], list[float], float]:
    """(host ms per phase, GPU ms per phase, wall ms per step) over `steps` unsynchronised steps."""
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(steps)]
    host: list[float] = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for ev in events:
        phased_step(model, opt, batch, ev, host)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    gpu = [[ev[i].elapsed_time(ev[i + 1]) for ev in events] for i in range(3)]
    host_ms = [[h * 1e3 for h in host[i::3]] for i in range(3)]
    return [statistics.median(h) for h in host_ms], [statistics.median(g) for g in gpu], wall


def head_start(model, opt, batch, steps: int, sleep_ms: float) -> list[float]:
    """GPU ms per phase with each phase queued behind a sleep kernel (its kernels' time alone, as
    far as the launch queue holds the phase: ~1,000 launches, then the host catches up anyway)."""
    cycles = int(sleep_ms * gpu_cycles_per_ms())
    spans: list[list[float]] = [[] for _ in PHASES]

    def timed(i, fn):
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        spans[i].append(start.elapsed_time(end))
        return out

    for _ in range(steps):
        loss = timed(0, lambda: model(**batch).loss)
        timed(1, loss.backward)
        timed(2, lambda: step_optimizer(opt))
    return [statistics.median(s) for s in spans]


def gpu_cycles_per_ms() -> float:
    """Clock cycles of torch.cuda._sleep per millisecond on this GPU, measured once."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def profile_forward(model, batch, passes: int = 3, rows: int = 50) -> None:
    """cProfile of `passes` forward passes (graph kept and dropped, as in training): the host's side."""
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(passes):
        model(**batch).loss
    prof.disable()
    torch.cuda.synchronize()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(rows)
        print(f"\ncProfile of {passes} forward passes, by {key}:\n" + "\n".join(out.getvalue().splitlines()[4:]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--contenders", default="frozen,peftkit")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile-forward", default="", help="a contender whose forward passes cProfile prints")
    args = parser.parse_args()
    batch = tt.make_batch(args.shape)
    print(f"{args.shape}, batch {tuple(batch['input_ids'].shape)}, ms per step (medians over {args.steps} steps)")
    print(f"{'contender':10s} {'phase':10s} {'host':>7s} {'gpu':>7s} {'busy':>7s} {'wait':>7s}")
    for contender in args.contenders.split(","):
        model, opt = tt.prepare(contender, tt.build_model(args.shape), checkpointing=False)
        for _ in range(3):
            tt.train_step(model, opt, batch)
        host, gpu, wall = free_running(model, opt, batch, args.steps)
        busy = head_start(model, opt, batch, args.steps, sleep_ms=max(200.0, 2 * max(host)))
        for name, h, g, b in zip(PHASES, host, gpu, busy):
            print(f"{contender:10s} {name:10s} {h:7.1f} {g:7.1f} {b:7.1f} {g - b:7.1f}")
        print(f"{contender:10s} {'step':10s} {sum(host):7.1f} {sum(gpu):7.1f} {sum(busy):7.1f} {sum(gpu) - sum(busy):7.1f}"
              f"   wall {wall:.1f}", flush=True)
        if contender == args.profile_forward:
            profile_forward(model, batch)
        del model, opt
        tt.free_memory()


if __name__ == "__main__":
    main()
