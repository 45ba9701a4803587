"""Ψ_s, the stage function of spec §2, with its gradients and Hessian-vector products in (z, θ)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sm_dist.math.curvature import shares_storage

# Layers that make f affine in its parameters wherever it is differentiable, when they surround
# a single Linear or convolution: piecewise-linear and parameter-free.
_AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                     nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.Flatten, nn.Unflatten,
                     nn.Identity)


def affine_in_parameters(module: nn.Module) -> bool:
    """Whether the stage's f(z, θ) is affine in θ for fixed z (almost everywhere): nested
    Sequentials of exactly one Linear/Conv with trainable parameters among piecewise-linear,
    parameter-free layers (exact types: a subclass may compute anything). Then Ψ has no
    second derivative of f in θ alone, ∂²Ψ/∂θ² = J_θᵀ C J_θ, which add_local_hvp exploits."""
    trainable, leaves = [], []
    for m in module.modules():
        has_children = next(m.children(), None) is not None
        if has_children and type(m) is not nn.Sequential:
            return False  # a container's own forward may combine its children in any way
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            if has_children:
                return False
            trainable.append(m)
        if not has_children:
            leaves.append(m)
    if len(trainable) != 1 or type(trainable[0]) not in _AFFINE_LAYERS:
        return False
    return all(m is trainable[0] or type(m) in _PIECEWISE_LINEAR for m in leaves)


class _PsiCotangent(torch.autograd.Function):
    """∂Ψ/∂f = g + c·(f − z_out) at f = z_out: its value is g itself (the residual is zero) and
    its derivative along f is c. The same values and products to the bit as building
    g + c·(out − out.detach()), without an output-sized zero residual and sum per microbatch
    (their graph would keep the sum alive as long as Ψ's)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, out: Tensor, g: Tensor,
                c: Tensor) -> Tensor:
        ctx.save_for_backward(c)
        return g.view_as(g)  # g's own storage: nothing allocated

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: Tensor) -> tuple[Tensor, None, None]:
        (c,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * c, None, None


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector so that it broadcasts over one sample's features."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


class StageFunction:
    """Ψ(z, θ) = Σ_k ⟨g_k, f(z_k, θ) − z_out,k⟩ + ½ c_k ‖f(z_k, θ) − z_out,k‖² around (z_in, θ_t).

    `module` computes f at its current parameters θ_t; `z_in` holds the stored inputs of the
    samples, `g` and `c` the gradient and per-sample curvature received from above. z_out is
    the recorded output itself, so the residual is exactly zero at the base point.

    The first derivatives are built once with `create_graph=True`; every Hessian-vector product
    is then one backward pass through that retained graph (Pearlmutter's trick by double
    backward), which measured ~30x cheaper than torch.func's forward-over-reverse on CPU.
    They are f's vector-Jacobian product with ∂Ψ/∂f = g + c·(f − z_out) given directly, not the
    backward of Ψ's sums and squares: the same values to the bit (tested), a smaller graph for
    every product to traverse.
    For stage 1, whose input X is fixed, z does not require grad and no z derivatives are built.
    """

    def __init__(self, z: Tensor, out: Tensor, params: list[Tensor], g: Tensor, c: Tensor, *,
                 affine_in_params: bool = False) -> None:
        """From a forward already recorded by autograd: `out` = f(z, params) with its graph.

        `z` requires grad exactly when input derivatives are wanted (every stage but the first).
        `affine_in_params`: f is affine in θ (`affine_in_parameters` of the module), which
        lets 𝓗w take one matrix product fewer per layer (add_local_hvp).
        """
        self.params = params
        self.affine_in_params = affine_in_params
        self.with_input = z.requires_grad
        self.z = z
        self.out = out
        self._vjp: tuple[Tensor, tuple[Tensor, ...]] | None = None  # for tangents (CGBlock)
        with torch.enable_grad():
            psi_out = _PsiCotangent.apply(out, g, per_sample(c, out))  # ∂Ψ/∂f
            inputs = ([z] if self.with_input else []) + params
            grads = torch.autograd.grad(out, inputs, grad_outputs=psi_out, create_graph=True,
                                        materialize_grads=True)
        self.grad_z: Tensor | None = grads[0] if self.with_input else None
        self.grad_theta: list[Tensor] = list(grads[1:] if self.with_input else grads)
        self.products = 0  # Hessian-vector products of Ψ, for cost accounting

    @classmethod
    def build(cls, module: nn.Module, z_in: Tensor, g: Tensor, c: Tensor, *,
              with_input: bool = True, affine_in_params: bool | None = None) -> StageFunction:
        """Run the forward of `module` on `z_in` and build Ψ around it (`affine_in_params`:
        by default `affine_in_parameters(module)`, as the optimizers decide it)."""
        if affine_in_params is None:
            affine_in_params = affine_in_parameters(module)
        z = z_in.detach().requires_grad_(with_input)
        with torch.enable_grad():
            out = module(z)
        return cls(z, out, trainable_parameters(module), g, c, affine_in_params=affine_in_params)

    def _diff(self, outputs: list[Tensor], directions: list[Tensor],
              wrt: list[Tensor]) -> tuple[Tensor, ...]:
        self.products += 1
        return torch.autograd.grad(outputs, wrt, grad_outputs=directions, retain_graph=True,
                                   materialize_grads=True)

    def gradients(self) -> tuple[Tensor | None, list[Tensor]]:
        """(∇_z Ψ, ∇_θ Ψ) at the base point: ∂h/∂z_{s-1} and ∂h/∂θ_s for these samples."""
        gz = None if self.grad_z is None else self.grad_z.detach()
        return gz, [t.detach() for t in self.grad_theta]

    def hvp(self, u: Tensor, w: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """The full Hessian of Ψ in (z, θ) times (u, w): (H_zz u + H_zθ w, H_θz u + H_θθ w)."""
        assert self.grad_z is not None, "built without input derivatives"
        out = self._diff([self.grad_z, *self.grad_theta], [u, *w], [self.z, *self.params])
        return out[0], list(out[1:])

    def hvp_theta(self, w: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        """H(0, w) = (H_zθ w, H_θθ w); the z part is None when built without input derivatives."""
        wrt = ([self.z] if self.with_input else []) + self.params
        out = self._diff(self.grad_theta, w, wrt)
        if self.with_input:
            return out[0], list(out[1:])
        return None, list(out)

    def hvp_z_theta_part(self, u: Tensor) -> list[Tensor]:
        """The θ part of H(u, 0): H_θz u."""
        assert self.grad_z is not None, "built without input derivatives"
        return list(self._diff([self.grad_z], [u], self.params))

    def add_local_hvp(self, w: list[Tensor], delta: Tensor | None, out: Tensor) -> None:
        """Add this microbatch's share of SM's 𝓗w to the flat `out`: H_θθ w, then
        H_θz Δ⁻¹ H_zθ w for stages with an input (whose per-sample δ is `delta`). Each term
        is added to `out` in turn: the sum's order is part of the iterates' bits."""
        if delta is not None and self.affine_in_params:
            self._add_affine_local_hvp(w, delta, out)
            return
        a, b = self.hvp_theta(w)
        _add_flat(out, b)
        if delta is not None:
            assert a is not None
            _add_flat(out, self.hvp_z_theta_part(_per_delta(a, delta, w)))

    def _add_affine_local_hvp(self, w: list[Tensor], delta: Tensor, out: Tensor) -> None:
        """The same 𝓗w when f is affine in θ, in one matrix product fewer per layer.

        With H = K + JᵀCJ (K: ∂Ψ/∂f times f's second derivatives, zero in θθ here),
        H_θθ w + H_θz a = J_θᵀ(C J_θ w) + K_θz a + J_θᵀ(C J_z a): the first backward stops its
        θθ part at f, keeping the cotangent q = C J_θ w it leaves there, and the second
        applies J_θᵀ once to q + C J_z a instead of once to each. Same value, other rounding.
        """
        a, q = self._diff(self.grad_theta, w, [self.z, self.out])
        _add_flat(out, list(self._diff([self.grad_z, self.out], [_per_delta(a, delta, w), q],
                                       self.params)))

    # Tangent passes (CGBlock, spec §6): with c = 0, Ψ's second derivatives are exactly the
    # terms ⟨g, f⟩ adds to the network's Hessian, so a Hessian-vector product of the whole
    # network is a forward of tangents (Jacobian products) and a backward that adds these terms.
    def tangent(self, u: Tensor | None, w: list[Tensor] | None) -> Tensor:
        """J_z u + J_θ w, the change of f along (u, w) (a Jacobian-vector product).

        By double backward: the vector-Jacobian product a ↦ Jᵀa is linear in a, so J·(u, w) is
        its gradient with respect to a; that graph is built once per stage function.
        """
        wrt = ([self.z] if self.with_input else []) + self.params
        if self._vjp is None:
            a = torch.zeros_like(self.out, requires_grad=True)
            with torch.enable_grad():
                vjp = torch.autograd.grad(self.out, wrt, grad_outputs=a, create_graph=True,
                                          materialize_grads=True)
            self._vjp = (a, vjp)
        a, vjp = self._vjp
        outputs, directions = [], []
        if u is not None:
            assert self.with_input, "built without input derivatives"
            outputs.append(vjp[0])
            directions.append(u)
        if w is not None:
            outputs.extend(vjp[1:] if self.with_input else vjp)
            directions.extend(w)
        self.products += 1
        return torch.autograd.grad(outputs, a, grad_outputs=directions, retain_graph=True,
                                   materialize_grads=True)[0]

    def tangent_input(self, rg: Tensor, u: Tensor) -> Tensor:
        """J_zᵀ r + H_zz u: the change of ∂h/∂z_in along a tangent that entered below this
        stage (r is the change of the gradient received from above, u the input's tangent)."""
        assert self.grad_z is not None, "built without input derivatives"
        return self._diff([self.out, self.grad_z], [rg, u], [self.z])[0]

    def tangent_params(self, rg: Tensor, w: list[Tensor]) -> list[Tensor]:
        """J_θᵀ r + H_θθ w: the change of ∂h/∂θ along this stage's own direction w."""
        return list(self._diff([self.out, *self.grad_theta], [rg, *w], self.params))

    def hvp_zz(self, u: Tensor) -> Tensor:
        """H_zz u, the z block alone (what the power iteration needs)."""
        assert self.grad_z is not None, "built without input derivatives"
        return self._diff([self.grad_z], [u], [self.z])[0]


class RecomputedStageFunction:
    """Ψ of one microbatch kept as its input and (g, c) alone, not as a graph: each product
    rebuilds the stage's forward and Ψ's first derivatives (`optimizer.recompute`), so that
    one microbatch's graph is alive at a time instead of all of them. The forward must be
    deterministic (no dropout) for the rebuilt Ψ to be the one the backward built."""

    def __init__(self, module: nn.Module, fn: StageFunction, g: Tensor, c: Tensor) -> None:
        self.module = module
        self.params = fn.params
        self.with_input = fn.with_input
        self.affine_in_params = fn.affine_in_params
        self.z_in = fn.z.detach()
        self.g, self.c = g, c
        self.products = fn.products  # the backward's (power iteration) count on

    def built(self) -> StageFunction:
        """Ψ rebuilt at the parameters' current values (θ_t: the inner loop leaves them)."""
        return StageFunction.build(self.module, self.z_in, self.g, self.c,
                                   with_input=self.with_input,
                                   affine_in_params=self.affine_in_params)

    def add_local_hvp(self, w: list[Tensor], delta: Tensor | None, out: Tensor) -> None:
        fn = self.built()
        fn.add_local_hvp(w, delta, out)
        self.products += fn.products


def flatten(tensors: list[Tensor]) -> Tensor:
    """Tensors as one flat vector (the local loss's d, 𝓗v and g_θ)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Views of the flat `vector` shaped as the tensors of `like`, in order."""
    out, offset = [], 0
    for t in like:
        out.append(vector[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def _per_delta(a: Tensor, delta: Tensor, directions: list[Tensor]) -> Tensor:
    """Δ⁻¹a, per sample: in a's own buffer (one input-sized tensor fewer alive per product)
    unless autograd handed back a tensor it does not own alone (a direction passed through).
    The same values as out of place."""
    if a.is_contiguous() and not any(shares_storage(a, t) for t in directions):
        return a.div_(per_sample(delta, a))
    return a / per_sample(delta, a)


def _add_flat(out: Tensor, tensors: list[Tensor]) -> None:
    """out += flatten(tensors), in place piece by piece: the same sums without a concatenated
    copy (a fresh large buffer costs page faults on every product)."""
    for piece, t in zip(unflatten(out, tensors), tensors, strict=True):
        piece += t


def trainable_parameters(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]
