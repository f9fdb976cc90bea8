"""Heads: the per-example objective ℓ_n whose input gradient is penalised, and the data term.

Each head supplies, at the logits z (B, ...), computed in float32 at least (as torch's
autocast runs losses):
- the data term per example (what the loss averages) and its gradient at z;
- ∇_z ℓ_n, the seed of the input-gradient chain (pass 2);
- the Hessian-vector product H t of Σ_n ℓ_n at z (pass 3 → 4), or None where H = 0;
- ``per_example(z, y)``: (data, ℓ) as differentiable torch expressions, for the autograd
  fallback.

Named heads (K = number of outputs per example; p = softmax(z); σ the logistic function):
ce:          data = ℓ = −Σ_k a_k log p_k;  ∇ℓ = s p − a;  H t = s (p ⊙ t − p (pᵀt)),
             s = Σ_k a_k, with a = e_y (labels), a = q (probability targets y of z's shape),
             label smoothing ε: a ← (1 − ε) a + ε/K, class weights w: a ← w ⊙ a (torch's
             per-example cross_entropy with these options); plain labels run the backend's
             fused softmax head
logprob_sum: data = CE (with the same options);  ℓ = −(1/K) Σ_k log p_k;  ∇ℓ = p − 1/K;
             H t = p ⊙ t − p (pᵀt)
output:      data = ℓ = Σ_k z_k (a scalar critic score);  ∇ℓ = 1;  H = 0
mse:         data = ℓ = (1/K) Σ_k (z_k − y_k)²;  ∇ℓ = 2 (z − y)/K;  H t = 2 t / K
bce:         data = ℓ = (1/K) Σ_k [log(1 + e^{z_k}) − y_k z_k];  ∇ℓ = (σ(z) − y)/K;
             H t = σ(z)(1 − σ(z)) ⊙ t / K   (multi-label logits, targets in [0, 1])

A callable ``head(z, y) -> (B,)`` is any twice-differentiable per-example loss: its
gradient and Hessian-vector products come from autograd on the logits alone (a (B, K)
graph, tiny next to the network's). ``data=`` gives the data term separately (a name or a
callable); by default it is the head's own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks
from ..backend_protocol import Backend

HEADS = ("ce", "logprob_sum", "output", "mse", "bce")
#: heads whose y are class labels (or probability targets), and heads whose y are targets
#: of the logits' shape
CLASS_HEADS = ("ce", "logprob_sum")
TARGET_HEADS = ("mse", "bce")


@dataclass
class HeadEval:
    data: Tensor       # (B,) per-example data term
    data_grad: Tensor  # (B, ...) gradient of data_n at z_n
    pen_grad: Tensor   # (B, ...) ∇_z ℓ_n, the seed of pass 2


def _f32(z: Tensor) -> Tensor:
    """z in float32 at least (bf16 / float16 logits under autocast)."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _per_row(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _check_matrix_logits(name: str, z: Tensor) -> None:
    if z.dim() != 2:
        raise ValueError(f"head={name!r} needs (B, K) logits from the model, "
                         f"got shape {tuple(z.shape)}")


class SoftmaxHead:
    """The two softmax heads over plain class labels: the backend's fused softmax head (CE
    data term, p, both gradients) and the softmax Hessian."""

    uniform = False
    name = "ce"
    uses_labels = True
    #: a label outside [0, K) gives its row a NaN data term and gradient (every backend's
    #: softmax head), so the deferred finite check finds it without reading the labels
    nan_on_bad_labels = True

    def __init__(self, kernels: Backend) -> None:
        self.kernels = kernels

    def checks_own_labels(self, z: Tensor) -> bool:
        """Whether the backend's softmax head raises for a label outside [0, K) itself."""
        return self.kernels.head_checks_labels(z)

    def evaluate(self, z: Tensor, y: Tensor) -> HeadEval:
        _check_matrix_logits(self.name, z)
        ce, self.p, data_grad, pen_grad = self.kernels.softmax_head(z, y, self.uniform)
        return HeadEval(ce, data_grad, pen_grad)

    def hvp(self, t: Tensor) -> Tensor | None:
        return self.kernels.softmax_hvp(self.p, t)

    def per_example(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logp = F.log_softmax(_f32(z), dim=1)
        data = -logp.gather(1, y.long()[:, None]).squeeze(1)
        return data, (-logp.mean(1) if self.uniform else data)


class CEHead(SoftmaxHead):
    name = "ce"


class LogProbSumHead(SoftmaxHead):
    name = "logprob_sum"
    uniform = True


class WeightedSoftmaxHead:
    """Cross-entropy against class weights a (B, K) built from labels or probability
    targets, label smoothing and class weights (module docstring); with ``uniform`` the
    penalised ℓ is logprob_sum's −mean_k log p_k while the data term keeps a."""

    uses_labels = True

    def checks_own_labels(self, z: Tensor) -> bool:
        return False

    def __init__(self, kernels: Backend, label_smoothing: float, weight: Tensor | None,
                 uniform: bool = False) -> None:
        self.kernels, self.eps = kernels, label_smoothing
        self.weight, self.uniform = weight, uniform
        self.name = "logprob_sum" if uniform else "ce"

    def _a(self, y: Tensor, k: int, like: Tensor) -> Tensor:
        if y.is_floating_point():
            a = y.to(like.dtype)
        else:
            a = F.one_hot(y.long(), k).to(like.dtype)
        if self.eps:
            a = a * (1.0 - self.eps) + self.eps / k
        if self.weight is not None:
            a = a * self.weight.to(like.dtype)
        return a

    def evaluate(self, z: Tensor, y: Tensor) -> HeadEval:
        _check_matrix_logits(self.name, z)
        if y.is_floating_point() and y.shape != z.shape:
            raise ValueError(f"head={self.name!r} needs probability targets y of the logits' "
                             f"shape {tuple(z.shape)}, got {tuple(y.shape)}")
        if self.weight is not None and self.weight.shape != (z.shape[1],):
            raise ValueError(f"class_weight has {self.weight.numel()} weights but the model "
                             f"has {z.shape[1]} outputs")
        zf = _f32(z)
        logp = torch.log_softmax(zf, dim=1)
        self.p = p = logp.exp()
        a = self._a(y, z.shape[1], zf)
        s = a.sum(1, keepdim=True)
        data = -(a * logp).sum(1)
        data_grad = s * p - a
        pen_grad = p - 1.0 / z.shape[1] if self.uniform else data_grad
        self.s = None if self.uniform else s
        return HeadEval(data, data_grad, pen_grad)

    def hvp(self, t: Tensor) -> Tensor | None:
        ht = self.kernels.softmax_hvp(self.p, t)
        return ht if self.s is None else ht * self.s

    def per_example(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        zf = _f32(z)
        logp = F.log_softmax(zf, dim=1)
        data = -(self._a(y, z.shape[1], zf) * logp).sum(1)
        return data, (-logp.mean(1) if self.uniform else data)


class OutputHead:
    name = "output"
    uses_labels = False

    def evaluate(self, z: Tensor, y: Tensor | None) -> HeadEval:
        ones = torch.ones_like(z)
        return HeadEval(_per_row(z).sum(1), ones, ones)

    def hvp(self, t: Tensor) -> Tensor | None:
        return None

    def per_example(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        data = _per_row(z).sum(1)
        return data, data


class _TargetHead:
    """A loss averaged over the K outputs of each example against targets of the logits'
    shape: ℓ_n = (1/K) Σ_k e(z_k, y_k), ∇ℓ = e′(z, y)/K, H t = e″(z, y) ⊙ t / K, from the
    backend's ``target_head`` (one C++ / Triton sweep per row, torch ops elsewhere), on the
    logits viewed as (B, K), in float32 at least."""

    name = ""
    uses_labels = False

    def __init__(self, kernels=None) -> None:
        self.kernels = kernels

    def _targets(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if y.shape != z.shape:
            raise ValueError(f"head={self.name!r} needs targets y of the logits' shape "
                             f"{tuple(z.shape)}, got {tuple(y.shape)}")
        zf = _per_row(_f32(z)).contiguous()
        return zf, _per_row(y).to(zf.dtype).contiguous()

    def evaluate(self, z: Tensor, y: Tensor) -> HeadEval:
        zf, yf = self._targets(z, y)
        self.k = zf.shape[1]
        data, grad, self.d2 = self.kernels.target_head(self.name, zf, yf)
        grad = grad.view(z.shape)
        return HeadEval(data, grad, grad)

    def hvp(self, t: Tensor) -> Tensor | None:
        if self.d2 is None:  # mse: e″/K = 2/K
            return t * (2.0 / self.k)
        return (_per_row(t) * self.d2).view(t.shape)

    def per_example(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        zf, yf = self._targets(z, y)
        data = self._value(zf, yf).mean(1)
        return data, data

    def _value(self, z: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError


class MSEHead(_TargetHead):
    """Mean squared error per example: e = (z − y)², e′ = 2 (z − y), e″ = 2."""

    name = "mse"

    def _value(self, z: Tensor, y: Tensor) -> Tensor:
        return (z - y) ** 2


class BCEHead(_TargetHead):
    """Binary cross-entropy on logits per example (multi-label, targets in [0, 1]):
    e = log(1 + e^z) − y z, e′ = σ(z) − y, e″ = σ(z)(1 − σ(z))."""

    name = "bce"

    def _value(self, z: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")


#: callables already checked to be per-example (the check runs on a callable's first use)
_PER_EXAMPLE_CHECKED: weakref.WeakSet = weakref.WeakSet()


class CallableHead:
    """A user's per-example loss ``fn(z, y) -> (B,)``: ∇_z ℓ and H t by autograd on the
    logits alone (create_graph on a (B, K) graph), in float32 at least."""

    uses_labels = False

    def __init__(self, fn: Callable[[Tensor, Tensor | None], Tensor]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def _call(self, z: Tensor, y: Tensor | None) -> Tensor:
        out = self.fn(z, y)
        if not isinstance(out, Tensor):
            raise TypeError(f"head {self.name!r} must return a tensor of per-example losses, "
                            f"got {type(out).__name__}")
        if out.shape != (z.shape[0],):
            raise ValueError(f"head {self.name!r} must return per-example losses of shape "
                             f"(B,) = ({z.shape[0]},), got {tuple(out.shape)} (use "
                             "reduction='none' and reduce over the non-batch dimensions)")
        if not out.is_floating_point():
            raise TypeError(f"head {self.name!r} returned {out.dtype}, not a float tensor")
        return out

    def evaluate(self, z: Tensor, y: Tensor | None) -> HeadEval:
        with torch.enable_grad(), torch.autocast(z.device.type, enabled=False):
            self.z = zf = _f32(z).detach().requires_grad_(True)
            ell = self._call(zf, y)
            if not ell.requires_grad:
                raise ValueError(f"head {self.name!r} returned losses that do not depend on "
                                 "the logits z (is it differentiable in z?)")
            (g,) = torch.autograd.grad(ell.sum(), zf, create_graph=True)
            self._check_per_example(ell, zf)
            if not g.requires_grad:
                self._check_linear(zf, y, g)
        self.g = g
        return HeadEval(ell.detach(), g.detach(), g.detach())

    def _check_per_example(self, ell: Tensor, zf: Tensor) -> None:
        """∂ℓ_0/∂z_m = 0 for every m ≠ 0 (a loss that mixes the batch, a batch mean say, has
        no per-example input gradient); checked once per callable."""
        try:
            if self.fn in _PER_EXAMPLE_CHECKED:
                return
        except TypeError:  # not hashable / weak-referenceable: checked every call
            pass
        if zf.shape[0] > 1:
            (g0,) = torch.autograd.grad(ell[0], zf, retain_graph=True, allow_unused=True)
            if g0 is not None and bool((g0[1:] != 0).any()):
                raise ValueError(f"head {self.name!r} is not per-example: loss 0 depends on "
                                 "the logits of other examples (the head must be ℓ_n(z_n, "
                                 "y_n) for each n, e.g. reduction='none')")
        try:
            _PER_EXAMPLE_CHECKED.add(self.fn)
        except TypeError:
            pass

    def _check_linear(self, zf: Tensor, y: Tensor | None, g: Tensor) -> None:
        """A gradient without a graph means H = 0 (a head linear in z) or a head autograd
        cannot differentiate twice (a once_differentiable Function): the gradient at a
        nearby z tells them apart."""
        dz = 1e-2 * (1.0 + zf.detach().abs()) * torch.sign(torch.randn_like(zf))
        z2 = (zf.detach() + dz).requires_grad_(True)
        (g2,) = torch.autograd.grad(self._call(z2, y).sum(), z2)
        scale = float(g.abs().max()) + 1e-30
        if float((g2 - g).abs().max()) > 1e-4 * scale:
            raise ValueError(f"head {self.name!r} is not twice differentiable in z: its "
                             "gradient changes with z but carries no autograd graph (a "
                             "once_differentiable Function, or a gradient computed under "
                             "no_grad)")

    def hvp(self, t: Tensor) -> Tensor | None:
        if not self.g.requires_grad:  # ∇ℓ does not depend on z: H = 0
            return None
        try:
            with torch.enable_grad():
                (ht,) = torch.autograd.grad(self.g, self.z, grad_outputs=t.to(self.g.dtype),
                                            retain_graph=True, allow_unused=True)
        except RuntimeError as e:
            raise ValueError(f"head {self.name!r} is not twice differentiable in z: {e}") \
                from e
        return torch.zeros_like(t) if ht is None else ht

    def per_example(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        with torch.autocast(z.device.type, enabled=False):
            ell = self._call(_f32(z), y)
        return ell, ell


class DataTermHead:
    """A penalised head with a different data term (``data=``): the data term and its
    gradient from one head, ∇ℓ and H t from the other."""

    def __init__(self, penalised, data) -> None:
        self.pen, self.data = penalised, data
        self.name = penalised.name
        self.uses_labels = penalised.uses_labels or data.uses_labels

    def checks_own_labels(self, z: Tensor) -> bool:
        return False

    def evaluate(self, z: Tensor, y: Tensor | None) -> HeadEval:
        ev, dv = self.pen.evaluate(z, y), self.data.evaluate(z, y)
        return HeadEval(dv.data, dv.data_grad, ev.pen_grad)

    def hvp(self, t: Tensor) -> Tensor | None:
        return self.pen.hvp(t)

    def per_example(self, z: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.data.per_example(z, y)[0], self.pen.per_example(z, y)[1]


def validate_head(head, what: str = "head") -> None:
    """head is a named head or a callable."""
    if isinstance(head, str):
        if head not in HEADS:
            raise ValueError(f"{what} must be one of {HEADS} or a callable head(z, y) -> (B,), "
                             f"got {head!r}")
    elif not callable(head):
        raise TypeError(f"{what} must be one of {HEADS} or a callable head(z, y) -> (B,), "
                        f"got {type(head).__name__}")


def _one_head(head, kernels, label_smoothing: float, class_weight: Tensor | None,
              soft_targets: bool):
    validate_head(head)
    if not isinstance(head, str):
        return CallableHead(head)
    if head in CLASS_HEADS:
        if label_smoothing or class_weight is not None or soft_targets:
            return WeightedSoftmaxHead(kernels, label_smoothing, class_weight,
                                       uniform=head == "logprob_sum")
        return CEHead(kernels) if head == "ce" else LogProbSumHead(kernels)
    if head == "output":  # Σ_k z_k needs no kernel
        return OutputHead()
    return {"mse": MSEHead, "bce": BCEHead}[head](kernels)


def make_head(head, kernels, data=None, label_smoothing: float = 0.0,
              class_weight: Tensor | None = None, soft_targets: bool = False):
    """The head object for ``gradreg_loss``'s ``head=`` / ``data=`` and CE options."""
    pen = _one_head(head, kernels, label_smoothing, class_weight, soft_targets)
    if data is None:
        return pen
    return DataTermHead(pen, _one_head(data, kernels, label_smoothing, class_weight,
                                       soft_targets))


def needs_class_labels(head, data=None) -> bool:
    """Whether y must be class labels (or probability targets): a softmax head is named."""
    return any(isinstance(h, str) and h in CLASS_HEADS for h in (head, data))


def check_head_targets(head, data, y: Tensor | None, x: Tensor, label_smoothing: float,
                       class_weight: Tensor | None) -> tuple[Tensor | None, bool]:
    """y checked for the heads named (labels as int64, probability targets, targets of the
    logits' shape); returns (y, whether y holds probability targets)."""
    names = [h for h in (head, data) if isinstance(h, str)]
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if class_weight is not None:
        if not isinstance(class_weight, Tensor) or class_weight.dim() != 1 \
                or not class_weight.is_floating_point():
            raise ValueError("class_weight must be a 1-D floating-point tensor of one weight "
                             "per class")
        if class_weight.device != x.device:
            raise ValueError(f"class_weight is on {class_weight.device} but x is on "
                             f"{x.device}")
    if (label_smoothing or class_weight is not None) and not any(
            n in CLASS_HEADS for n in names):
        raise ValueError("label_smoothing and class_weight apply to head 'ce' or "
                         "'logprob_sum'")
    wants_labels = any(n in CLASS_HEADS for n in names)
    wants_targets = any(n in TARGET_HEADS for n in names)
    if not (wants_labels or wants_targets):
        return y, False
    if y is None:
        raise ValueError(f"head={names[0]!r} needs {'labels' if wants_labels else 'targets'} y")
    if wants_labels and wants_targets:
        raise ValueError(f"heads {names} need different kinds of y (class labels and "
                         "targets of the logits' shape)")
    if wants_labels and isinstance(y, Tensor) and y.is_floating_point() and y.dim() != 2:
        raise TypeError(f"head={names[0]!r} needs y as an integer tensor of class labels (B,) "
                        f"or floating-point probability targets (B, K), got {y.dtype} of "
                        f"shape {tuple(y.shape)}")
    if wants_targets or (isinstance(y, Tensor) and y.is_floating_point()):
        if not isinstance(y, Tensor) or not y.is_floating_point():
            what = y.dtype if isinstance(y, Tensor) else type(y).__name__
            raise TypeError(f"head={names[0]!r} needs floating-point targets y, got {what}")
        if y.dim() < 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have the batch size {x.shape[0]} as its first "
                             f"dimension, got shape {tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        return y, wants_labels  # probability targets for a softmax head
    return checks.check_labels(y, x), False
