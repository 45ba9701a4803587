"""Loss registry: per-sample losses on the last stage's output and their smoothness constants.

A sample's output is a vector of logits (n, C) with an integer label each, or a sequence of
them (n, T, C) with one label per position (next-token prediction). A sequence's loss is the
mean over its positions, so h = (1/n) Σ_i (1/T) Σ_t ℓ(z_it, y_it) and every per-sample quantity
(the gradient, the curvature, the correct count) keeps the meaning it has for vectors.
"""

from __future__ import annotations

import math
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
    smoothness: Callable[[tuple[int, ...]], float]  # one sample's output shape -> L_loss


def _positions(shape: tuple[int, ...]) -> int:
    """Positions of one sample's output: 1 for a vector (C,), T for a sequence (T, C)."""
    return math.prod(shape[:-1])


def _cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    if z.dim() == 2:  # the classic path, unchanged: bit-identical results for vectors
        return F.cross_entropy(z, y, reduction="none")
    tokens = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="none")
    return tokens.reshape(z.shape[0], -1).mean(dim=1)


def _mse(z: Tensor, y: Tensor) -> Tensor:
    # PyTorch's MSELoss convention: mean over the output width (and positions) of (z - onehot(y))².
    target = F.one_hot(y, z.shape[-1]).to(z.dtype)
    if z.dim() == 2:
        return ((z - target) ** 2).mean(dim=1)
    return ((z - target) ** 2).reshape(z.shape[0], -1).mean(dim=1)


def _cross_entropy_smoothness(shape: tuple[int, ...]) -> float:
    # Each position's Hessian diag(p) - ppᵀ has largest eigenvalue at most 1/2; the sample's
    # Hessian is block diagonal over its T positions, each block scaled by the mean's 1/T.
    return 0.5 / _positions(shape)


def _mse_smoothness(shape: tuple[int, ...]) -> float:
    # (1/(T·w))‖z - y‖² has Hessian (2/(T·w))·I.
    return 2.0 / math.prod(shape)


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec("cross_entropy", _cross_entropy, _cross_entropy_smoothness),
    "mse": LossSpec("mse", _mse, _mse_smoothness),
}


def get_loss(name: str) -> LossSpec:
    """Look a loss up by its job-file name."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


def correct_predictions(z: Tensor, y: Tensor) -> int | float:
    """Σ over samples of the share of a sample's positions whose argmax is the label.

    A vector sample counts 0 or 1 (an int, as ever); a sequence counts the fraction of its
    tokens predicted right, so that correct / n is the token accuracy in both cases.
    """
    hits = z.detach().argmax(dim=-1) == y
    if hits.dim() == 1:
        return int(hits.sum())
    return float(hits.reshape(hits.shape[0], -1).to(torch.float64).mean(dim=1).sum())


@dataclass
class TopOfPipeline:
    """What the loss hands to the last stage for one microbatch (spec §2, 'Top of the pipeline')."""

    loss: Tensor  # Σ_k ℓ_k / n over this microbatch's samples (a 0-d tensor)
    correct: int | float  # samples whose argmax matches the label (sequences: token shares)
    grad: Tensor  # g_{p+1,k} = ∂h/∂z_{p,k}, already carrying the 1/n
    curvature: Tensor  # c_{p+1,k} = L_loss / n, one value per sample


def top_of_pipeline(spec: LossSpec, z: Tensor, y: Tensor, n: int) -> TopOfPipeline:
    """Loss, output gradient and output curvature of one microbatch of a batch of n samples."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = spec.per_sample(z, y).sum() / n
        (grad,) = torch.autograd.grad(loss, z)
    curvature = torch.full((z.shape[0],), spec.smoothness(tuple(z.shape[1:])) / n,
                           dtype=z.dtype, device=z.device)
    return TopOfPipeline(loss.detach(), correct_predictions(z, y), grad, curvature)


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


def evaluate_loss(spec: LossSpec, z: Tensor, y: Tensor) -> tuple[float, int | float]:
    """Summed per-sample loss and number of correct predictions (no gradients)."""
    with torch.no_grad():
        return float(spec.per_sample(z, y).sum()), correct_predictions(z, y)
