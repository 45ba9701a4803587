"""Minimising ⟨G,V⟩ + ½⟨V, UV + VA⟩: eigenbases (fresh or stale), Sylvester and Cholesky solves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Convention: V and G are d_out × P (kronecker.weight_matrix's layout). With the row-major vec of
# torch's reshape(-1), ⟨V, UV + VA⟩ = vec(V)ᵀ (U⊗I_P + I_{d_out}⊗A) vec(V); with the column-major
# vec of the note, the same matrix reads A⊗I + I⊗U.


@dataclass(frozen=True)
class Eigenbasis:
    """A bound F ⪯ Q diag(r) Qᵀ of a PSD factor F by an orthogonal Q (vectors) and r (values):
    equality for F's own eigendecomposition, a bound for a stale Q (stale_eigenbasis)."""

    vectors: Tensor
    values: Tensor

    def matrix(self) -> Tensor:
        """Q diag(r) Qᵀ, dense (for checks)."""
        return (self.vectors * self.values) @ self.vectors.T


def rounding_floor(dtype: torch.dtype) -> float:
    """The relative floor a factor summed in `dtype` needs: its rounding leaves eigenvalues of
    about eps·tr/dim where the exact factor has none, and the gradient's own rounding there
    would otherwise be divided by them (1e-12 in float64, 1.2e-6 in float32)."""
    return max(1e-12, 10.0 * torch.finfo(dtype).eps)


def damped_factor(factor: Tensor, damp: float = 0.0, floor: float = 1e-12,
                  in_place: bool = False) -> Tensor:
    """F + (damp + floor)·tr(F)/dim·I ⪰ F, so the bound stays a bound, in float64.

    `damp` (0.1-0.3 helped on minibatches) damps relative to the factor's own scale; `floor`
    keeps a rank-deficient A (a first layer on fewer samples than inputs) from dividing by ~0
    (rounding_floor of the dtype the factor was summed in). `in_place`: shift a float64 factor
    in its own storage (stage 0's Gram matrix, used once) instead of a copy.
    """
    factor = factor.to(torch.float64, copy=not in_place)
    shift = (damp + floor) * float(torch.trace(factor)) / factor.shape[0]
    factor.diagonal().add_(shift)
    return factor


def fresh_eigenbasis(factor: Tensor) -> Eigenbasis:
    """F = Q diag(λ) Qᵀ; the round-off's tiny negative eigenvalues of a PSD F read as 0."""
    values, vectors = torch.linalg.eigh(factor)
    return Eigenbasis(vectors, values.clamp_min(0.0))


def stale_eigenbasis(factor: Tensor, vectors: Tensor) -> Eigenbasis:
    """F ⪯ Q diag(r) Qᵀ with r_i = Σ_j |(QᵀFQ)_ij| for any orthogonal Q (an earlier basis).

    diag(r) − QᵀFQ is diagonally dominant with a non-negative diagonal, hence PSD (Gershgorin);
    the cost is two products instead of an eigendecomposition, and r = λ when Q is current.
    """
    rotated = vectors.T @ factor @ vectors
    return Eigenbasis(vectors, rotated.abs().sum(dim=1))


def _denominators(a_basis: Eigenbasis, u_basis: Eigenbasis | None) -> Tensor:
    """r_U,i + r_A,j: the eigenvalues of the Kronecker sum in the product basis. A zero one
    (no curvature at all: floor the factors) is replaced by the smallest positive float, so
    a zero gradient there gives a zero step instead of 0/0."""
    if u_basis is None:
        sums = a_basis.values[None, :]
    else:
        sums = u_basis.values[:, None] + a_basis.values[None, :]
    return sums.clamp_min(torch.finfo(sums.dtype).tiny)


def _rotate(matrix: Tensor, a_basis: Eigenbasis, u_basis: Eigenbasis | None) -> Tensor:
    """Q_Uᵀ X Q_A (Q_U = I when U = 0)."""
    right = matrix @ a_basis.vectors
    return right if u_basis is None else u_basis.vectors.T @ right


def kronecker_step(grad: Tensor, a_basis: Eigenbasis,
                   u_basis: Eigenbasis | None = None) -> Tensor:
    """The minimiser V of ⟨G,V⟩ + ½⟨V, UV + VA⟩ (U, A as their bases): UV + VA = −G, i.e.
    V = −Q_U [(Q_Uᵀ G Q_A) ⊘ (r_U,i + r_A,j)] Q_Aᵀ. `u_basis` None: U = 0, V = −G A⁻¹."""
    scaled = _rotate(grad, a_basis, u_basis) / _denominators(a_basis, u_basis)
    step = -scaled @ a_basis.vectors.T
    return step if u_basis is None else u_basis.vectors @ step


def kronecker_model_value(grad: Tensor, step: Tensor, a_basis: Eigenbasis,
                          u_basis: Eigenbasis | None = None) -> float:
    """⟨G,V⟩ + ½⟨V, UV + VA⟩ with the factors the bases stand for (the bound the step used);
    at kronecker_step's minimiser it is ½⟨G,V⟩ < 0, the predicted change of the loss."""
    rotated = _rotate(step, a_basis, u_basis)
    curvature = (rotated.square() * _denominators(a_basis, u_basis)).sum()
    return float((grad * step).sum() + 0.5 * curvature)


def inverse_factor(a_factor: Tensor, in_place: bool = False) -> Tensor:
    """A first layer's A⁻¹ (U = 0: no eigendecomposition needed), by Cholesky, in float64;
    `in_place`: the Cholesky factor, then the inverse, in a float64 factor's own storage,
    which it consumes, so one d² matrix is alive instead of three (stage 0's 785² is six
    times its weight).

    A must be positive definite: floor a rank-deficient one with damped_factor first. The
    explicit inverse costs a second triangular pass once; each step is then one product
    (G A⁻¹: 2.6 ms against the triangular solves' 4.0 ms for a 128 × 785 layer here), and on a
    full batch A's Z̃ᵀZ̃ is inverted once per run.
    """
    # A is symmetric, so its transpose is the same matrix in LAPACK's column-major order:
    # Cholesky and the inverse (LAPACK's potri, which works in place) then run in that
    # storage with no copy, and give the out-of-place routines' result (to the bit with some
    # LAPACK builds, to rounding with others; a test checks).
    work = a_factor.to(torch.float64, copy=not in_place).mT
    info = torch.empty((), dtype=torch.int32, device=work.device)
    torch.linalg.cholesky_ex(work, out=(work, info))
    if int(info) != 0:
        raise ValueError("A is not positive definite: floor it with damped_factor")
    return torch.cholesky_inverse(work, out=work)


def floored_inverse(damped_with: Callable[[float], Tensor], floor: float,
                    tries: int = 8) -> Tensor:
    """inverse_factor of the first of damped_with(floor), damped_with(10·floor), … that
    Cholesky accepts; `damped_with(f)` makes a float64 damped factor with relative floor f
    (damped_factor), which the inverse may consume.

    A factor summed in float32 can be indefinite by its rounding, which scales with its largest
    eigenvalue (about eps·λ_max), where the floor is relative to tr/dim: a first layer whose
    A is dominated by one direction (the inputs' mean) at a tiny loss failed so (the 2-layer
    MLP of docs/results with input_bound: exact, at iteration 74). A larger floor keeps the
    bound a bound, and a factor that needs none is inverted exactly as before.
    """
    for attempt in range(tries):
        try:
            return inverse_factor(damped_with(floor * 10.0 ** attempt), in_place=True)
        except ValueError:
            continue
    raise ValueError(f"a first layer's factor stayed indefinite with a floor of "
                     f"{floor * 10.0 ** (tries - 1):g}·tr/dim: its inputs hold non-finite values, "
                     "or its dtype is too coarse (try run.dtype: float64)")


def input_layer_step(grad: Tensor, inverse: Tensor, scale: float = 1.0) -> Tensor:
    """V = −G (scale·A)⁻¹ from A⁻¹: the minimiser of ⟨G,V⟩ + ½ scale⟨V, VA⟩, whose value
    there is ½⟨G,V⟩."""
    return grad @ inverse * (-1.0 / scale)


def model_value(grad: Tensor, step: Tensor, a_factor: Tensor,
                u_factor: Tensor | None = None) -> float:
    """⟨G,V⟩ + ½⟨V, UV + VA⟩ with dense factors (U None: 0): pass the factors the step was
    solved with, damping included, for the bound the step minimised."""
    curvature = (step * (step @ a_factor)).sum()
    if u_factor is not None:
        curvature = curvature + (step * (u_factor @ step)).sum()
    return float((grad * step).sum() + 0.5 * curvature)
