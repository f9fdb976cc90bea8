"""Models with their own forward (tests/graph_models.py) on the GPU backends vs the float64
oracle: the traced plan's nodes (residual sums, in-place ReLU, cat, chunk / split, nearest
upsampling, ConvTranspose2d, LayerNorm, functional forms) on Triton (the interpreter on
the CPU) and, on a CUDA device, the CUDA C++ backend. float32 within 1e-4, TF32 off."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from kernel_check import rel_err, step_backends

from gradreg_kernels import gradreg_loss
from reference import oracle_grads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from graph_models import MODEL_CASES, example_batch, tiny  # noqa: E402

CASES = ["resnet_small", "unet", "inception", "wgan_critic", "densenet", "functional_mlp"]


@pytest.mark.parametrize("backend", step_backends())
@pytest.mark.parametrize("name", CASES)
def test_graph_model_matches_oracle(name, backend, device):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = tiny(name, seed=7).to(device).train()
    x, y = example_batch(name, batch=3, seed=8)
    x, y = x.to(device), y.to(device)
    head = "output" if MODEL_CASES[name][2] == 1 else "ce"
    ref_model = copy.deepcopy(model).double()
    torch.manual_seed(0)
    out = gradreg_loss(model, x, y, 0.7, head=head, backend=backend)
    out.loss.backward()
    torch.manual_seed(0)
    grads_ref, loss_ref, _, _ = oracle_grads(ref_model, x.double(), y, 0.7, head)
    assert out.backend == backend
    assert rel_err(out.loss, loss_ref) < 1e-5
    errs = {n: rel_err(p.grad, grads_ref[n]) for n, p in model.named_parameters()}
    assert max(errs.values()) < 1e-4, errs
