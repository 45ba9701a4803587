"""Dense float64 references shared by the math tests: Ψ, 𝓗, h and a dense stand-in local loss."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from sm_dist.config.job import JobConfig, job_from_dict
from sm_dist.models.build import build_mlp

DTYPE = torch.float64
ACTIVATIONS = ("relu", "tanh", "gelu")


def flat(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Concatenate tensors into one detached vector."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, gen: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def tiny_mlp(widths: list[int], activation: str, seed: int,
             weight_norm: float | None = None) -> nn.Sequential:
    """A float64 MLP of sm_dist's layout; optionally every weight rescaled to that spectral norm."""
    torch.manual_seed(seed)
    model = build_mlp(widths, activation).to(DTYPE)
    if weight_norm is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    module.weight.mul_(weight_norm / torch.linalg.matrix_norm(module.weight, 2))
    return model


def param_dict(module: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    """Split a flat θ into `module`'s named parameters (parameters() order)."""
    out, offset = {}, 0
    for name, p in module.named_parameters():
        out[name] = theta[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def psi_dense(module: nn.Module, z_in: Tensor, g: Tensor, c: Tensor):
    """Ψ(x) for x = [flat z, flat θ], written from the spec, with z_out = f(z_in, θ_t) fixed."""
    z_in = z_in.detach()
    with torch.no_grad():
        z_out = module(z_in)
    nz = z_in.numel()
    cs = c.reshape(-1, *([1] * (z_out.dim() - 1)))

    def psi(x: Tensor) -> Tensor:
        z = x[:nz].view_as(z_in)
        out = functional_call(module, param_dict(module, x[nz:]), (z,))
        res = out - z_out
        return (g * res).sum() + 0.5 * (cs * res * res).sum()

    theta0 = flat(list(module.parameters()))
    return psi, torch.cat([z_in.reshape(-1), theta0])


def psi_hessian(module: nn.Module, z_in: Tensor, g: Tensor, c: Tensor) -> Tensor:
    """The full dense Hessian of Ψ in (z, θ), z first."""
    psi, x0 = psi_dense(module, z_in, g, c)
    return torch.func.hessian(psi)(x0)


def split_hessian(h: Tensor, nz: int) -> tuple[Tensor, Tensor, Tensor]:
    """(H_zz, H_zθ, H_θθ) of a Hessian ordered (z, θ)."""
    return h[:nz, :nz], h[:nz, nz:], h[nz:, nz:]


def per_sample_blocks(hzz: Tensor, samples: int) -> list[Tensor]:
    """The diagonal blocks of H_zz, one per sample."""
    w = hzz.shape[0] // samples
    return [hzz[k * w:(k + 1) * w, k * w:(k + 1) * w] for k in range(samples)]


def local_hessian_dense(module: nn.Module, z_in: Tensor, g: Tensor, c: Tensor,
                        delta: Tensor | None) -> Tensor:
    """𝓗 = H_θθ + H_θz Δ⁻¹ H_zθ (δ given), or H_θθ (δ None, stage 1), from the dense Hessian."""
    h = psi_hessian(module, z_in, g, c)
    hzz, hzt, htt = split_hessian(h, z_in.numel())
    if delta is None:
        return htt
    width = z_in.numel() // z_in.shape[0]
    inv = (1.0 / delta).repeat_interleave(width)
    return htt + hzt.T @ (inv[:, None] * hzt)


def mean_loss_of_theta(model: nn.Module, x: Tensor, y: Tensor, loss: str = "cross_entropy"):
    """h(θ) = (1/n) Σ ℓ(f(x_k, θ), y_k) as a function of the flat parameters of `model`."""

    def h(theta: Tensor) -> Tensor:
        z = functional_call(model, param_dict(model, theta), (x,))
        if loss == "cross_entropy":
            return F.cross_entropy(z, y)
        target = F.one_hot(y, z.shape[1]).to(z.dtype)
        return ((z - target) ** 2).mean(dim=1).mean()

    return h


def as_matrix(loss: Any) -> Tensor:
    """𝓗 of a local loss, column by column from its matrix-free product."""
    return torch.stack([loss.hvp(e) for e in torch.eye(loss.dim, dtype=DTYPE)], dim=1)


class DenseLocalLoss:
    """A stand-in for LocalLoss backed by a dense 𝓗 (the solvers use only this interface)."""

    def __init__(self, matrix: Tensor, grad: Tensor, rho: float = 0.0) -> None:
        self.matrix = matrix
        self.grad = grad
        self.rho = rho
        self.products = 0

    @property
    def dim(self) -> int:
        return self.grad.numel()

    def hvp(self, v: Tensor) -> Tensor:
        self.products += 1
        return self.matrix @ v

    def exact_value(self, d: Tensor) -> float:
        """L(d) straight from the definition, independent of any tracked 𝓗d."""
        return float(self.grad @ d + 0.5 * d @ (self.matrix @ d)
                     + (2.0 * self.rho / 3.0) * d.norm() ** 3)

    def value(self, d: Tensor, hd: Tensor) -> float:
        return float(self.grad @ d + 0.5 * (d @ hd) + (2.0 * self.rho / 3.0) * d.norm() ** 3)

    def gradient(self, d: Tensor, hd: Tensor) -> Tensor:
        return self.grad + hd + 2.0 * self.rho * d.norm() * d

    def line_value(self, d: Tensor, hd: Tensor, direction: Tensor, h_direction: Tensor):
        def phi(alpha: float) -> float:
            return self.value(d + alpha * direction, hd + alpha * h_direction)

        return phi


BASE_JOB: dict[str, Any] = {
    "name": "t",
    "model": {"mlp": {"widths": [4, 5, 4, 3], "activation": "tanh"}, "balance": [1, 1, 1]},
    "data": {"dataset": "synthetic", "synthetic": {"features": 4, "classes": 3, "train_size": 8,
                                                   "test_size": 4},
             "microbatches": 2},
    "optimizer": {"name": "sm"},
    "run": {"iterations": 1, "eval_every": 0, "dtype": "float64"},
}


def make_job(**sections: dict[str, Any]) -> JobConfig:
    """BASE_JOB with each given section's keys updated (one level deep, `mlp` merged too)."""
    raw = copy.deepcopy(BASE_JOB)
    for section, values in sections.items():
        values = dict(values)
        if section == "model" and "mlp" in values:
            raw["model"]["mlp"].update(values.pop("mlp"))
        if section == "data" and "synthetic" in values:
            raw["data"]["synthetic"].update(values.pop("synthetic"))
        raw[section].update(values)
    return job_from_dict(raw)


def whole_model(stage_modules: list[nn.Module]) -> nn.Sequential:
    """The stages chained back into one network sharing their parameters."""
    return nn.Sequential(*stage_modules)


LN10 = math.log(10.0)
