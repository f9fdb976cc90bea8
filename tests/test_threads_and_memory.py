"""gradreg_loss from several threads at once gives each model its own right answer, and
many steps keep memory flat: no graph, saved tensor or plan outlives its step."""

from __future__ import annotations

import copy
import gc
import threading

import torch
from graph_models import example_batch, tiny
from oracle_check import rel_err
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels import plan as plan_mod
from reference import oracle_grads


def _models() -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    out = []
    for i, name in enumerate(["resnet_small", "unet", "tanh_skip_mlp", "inception"]):
        x, y = example_batch(name, batch=3, seed=i)
        out.append((tiny(name, seed=i).train(), x, y))
    torch.manual_seed(9)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    out.append((mlp, torch.randn(5, 6), torch.randint(0, 3, (5,))))
    return out


def test_threads_on_different_models_get_their_own_answers():
    """Five models (four traced fresh, so tracing overlaps too), each stepped by its own
    thread four times, on the cpu backend; each thread's gradients equal the oracle's."""
    cases = _models()
    refs = []
    for model, x, y in cases:
        want, *_ = oracle_grads(copy.deepcopy(model).double(), x.double(), y, 0.6)
        refs.append(want)
    errors: list[str] = []
    barrier = threading.Barrier(len(cases))

    def work(i: int) -> None:
        model, x, y = cases[i]
        barrier.wait()
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            gradreg_loss(model, x, y, 0.6, backend="cpu").loss.backward()
            for name, p in model.named_parameters():
                err = rel_err(p.grad, refs[i][name], 1e-2 * float(refs[i][name].norm()) + 1e-6)
                if err > 1e-4:
                    errors.append(f"model {i} {name}: {err:.2e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_many_steps_keep_memory_flat():
    """After warm-up, 200 more steps of a traced model and a Sequential (an optimizer
    stepping in between) leave as many live tensors and kept plans as before them."""
    model, x, y = tiny("resnet_small"), *example_batch("resnet_small", batch=2)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    xm, ym = torch.randn(4, 6), torch.randint(0, 3, (4,))
    opt = torch.optim.SGD(list(model.parameters()) + list(mlp.parameters()), lr=1e-3)

    def steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            gradreg_loss(model, x, y, 0.5).loss.backward()
            gradreg_loss(mlp, xm, ym, 0.5).loss.backward()
            opt.step()

    steps(5)
    tensors, plans = _live_tensors(), len(plan_mod._PLANS)
    steps(200)
    assert _live_tensors() == tensors
    assert len(plan_mod._PLANS) == plans
