"""Loss registry: per-sample losses on the last stage's output and their smoothness constants."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossSpec:
    """A per-sample loss ℓ(z, y) and L_loss, a bound on the largest eigenvalue of ∂²ℓ/∂z²."""

    name: str
    per_sample: Callable[[Tensor, Tensor], Tensor]
    smoothness: Callable[[int], float]  # output width -> L_loss


def _cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(z, y, reduction="none")


def _mse(z: Tensor, y: Tensor) -> Tensor:
    # PyTorch's MSELoss convention: mean over the output width of (z - onehot(y))².
    target = F.one_hot(y, z.shape[1]).to(z.dtype)
    return ((z - target) ** 2).mean(dim=1)


LOSSES: dict[str, LossSpec] = {
    # diag(p) - ppᵀ has largest eigenvalue at most 1/2.
    "cross_entropy": LossSpec("cross_entropy", _cross_entropy, lambda width: 0.5),
    # (1/w)‖z - y‖² has Hessian (2/w)·I.
    "mse": LossSpec("mse", _mse, lambda width: 2.0 / width),
}


def get_loss(name: str) -> LossSpec:
    """Look a loss up by its job-file name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


@dataclass
class TopOfPipeline:
    """What the loss hands to the last stage for one microbatch (spec §2, 'Top of the pipeline')."""

    loss: Tensor  # Σ_k ℓ_k / n over this microbatch's samples (a 0-d tensor)
    correct: int  # samples whose argmax matches the label
    grad: Tensor  # g_{p+1,k} = ∂h/∂z_{p,k}, already carrying the 1/n
    curvature: Tensor  # c_{p+1,k} = L_loss / n, one value per sample


def top_of_pipeline(spec: LossSpec, z: Tensor, y: Tensor, n: int) -> TopOfPipeline:
    """Loss, output gradient and output curvature of one microbatch of a batch of n samples."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = spec.per_sample(z, y).sum() / n
        (grad,) = torch.autograd.grad(loss, z)
    curvature = torch.full((z.shape[0],), spec.smoothness(z.shape[1]) / n, dtype=z.dtype,
                           device=z.device)
    correct = int((z.detach().argmax(dim=1) == y).sum())
    return TopOfPipeline(loss.detach(), correct, grad, curvature)


class LossCurvature:
    """∂²h/∂z² of one microbatch's share of h = Σ ℓ / n, applied to vectors (CGBlock's top)."""

    def __init__(self, spec: LossSpec, z: Tensor, y: Tensor, n: int) -> None:
        self.z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = spec.per_sample(self.z, y).sum() / n
            (self.grad,) = torch.autograd.grad(loss, self.z, create_graph=True)

    def product(self, v: Tensor) -> Tensor:
        return torch.autograd.grad(self.grad, self.z, grad_outputs=v, retain_graph=True,
                                   materialize_grads=True)[0]


def evaluate_loss(spec: LossSpec, z: Tensor, y: Tensor) -> tuple[float, int]:
    """Summed per-sample loss and number of correct predictions (no gradients)."""
    with torch.no_grad():
        return float(spec.per_sample(z, y).sum()), int((z.argmax(dim=1) == y).sum())
