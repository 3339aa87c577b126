"""graph_train_step's CPU-checkable parts: the eager twin, the replay's input copies, capturable."""

import pytest
import torch

from peftkit.kernels import graph_train_step
from peftkit.kernels.graphs import make_capturable, replayer


def test_without_cuda_the_step_itself_comes_back_and_nothing_runs():
    calls = []

    def step(batch):
        calls.append(batch)
        return batch["x"].sum()

    assert graph_train_step(step, {"x": torch.ones(3)}, warmup=3) is step
    assert calls == []


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: 'replaying' recomputes out from the recorded buffers."""

    def __init__(self, buffers, out):
        self.buffers, self.out, self.replays = buffers, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.buffers[0] * 2 + self.buffers[1])


def test_replay_copies_every_tensor_leaf_into_its_buffer_then_returns_the_recorded_output():
    static = [torch.zeros(2), torch.zeros(2), "label"]
    out = torch.zeros(2)
    graph = _FakeGraph(static, out)
    run = replayer(graph, static, out)
    got = run({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}, "label")
    assert got is out and graph.replays == 1
    torch.testing.assert_close(got, torch.tensor([12.0, 24.0]))
    torch.testing.assert_close(static[0], torch.tensor([1.0, 2.0]))


def test_replay_rejects_a_different_argument_structure():
    run = replayer(_FakeGraph([torch.zeros(1)], torch.zeros(1)), [torch.zeros(1)], torch.zeros(1))
    with pytest.raises(ValueError, match="recorded with 1 argument leaves, got 2"):
        run(torch.zeros(1), torch.zeros(1))


def test_make_capturable_switches_adam_style_groups_and_leaves_sgd_alone():
    p = torch.nn.Parameter(torch.ones(2))
    adamw, sgd = torch.optim.AdamW([p]), torch.optim.SGD([p], lr=0.1)
    make_capturable(adamw)
    make_capturable(sgd)
    assert adamw.param_groups[0]["capturable"] is True
    assert "capturable" not in sgd.param_groups[0]


def test_make_capturable_refuses_an_optimizer_that_already_stepped_on_the_host():
    p = torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([p])
    p.grad = torch.ones(2)
    adam.step()
    with pytest.raises(ValueError, match="already stepped with capturable=False"):
        make_capturable(adam)
