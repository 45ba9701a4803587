"""sm_kron's layers of one stage: every Linear or Conv2d with the activation and pooling that
follow it is an SM layer of its own, its Kronecker factors summed microbatch by microbatch in
the backward and its closed-form step taken after it (sm_dist/math/kronecker*.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sm_dist.math.curvature import damped_curvature
from sm_dist.math.kronecker import (
    DTYPE,
    LayerTerms,
    LinearSamples,
    factor_weights,
    fold_bias,
    largest_curvature,
    linear_lambda_estimate,
    linear_layer_terms,
    linear_samples,
    linear_terms_of,
    row_weights,
    spectral_norm_sq,
    split_weight_matrix,
    terms_root,
    weight_matrix,
    weighted_gram,
)
from sm_dist.math.kronecker_conv import (
    ConvGeometry,
    ConvPixels,
    conv_factor_shares,
    conv_lambda_estimate,
    conv_largest_curvature,
    conv_patches,
    conv_pixel_terms,
)
from sm_dist.math.kronecker_gram import summed_input_gram
from sm_dist.math.kronecker_solve import (
    Eigenbasis,
    damped_factor,
    floored_inverse,
    fresh_eigenbasis,
    input_layer_step,
    kronecker_model_value,
    kronecker_step,
    stale_eigenbasis,
)

# Per-pixel entries a convolution's backward takes at once: 1 MB per term in float32 (half of it
# cost the CNN's stage 1 30% more time, in the extra calls of smaller blocks).
_PIXEL_ENTRIES = 1 << 18

ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Sigmoid, nn.LeakyReLU)


@dataclass(frozen=True)
class Damping:
    """How the per-sample δ and the factors are damped (the optimizer's options)."""

    delta_rel: float
    delta_abs: float
    delta_floor: float
    factor: float  # damp·tr(F)/dim·I added to each factor (keeps B an upper bound)
    eta: float  # the bound's η: how the cross term splits between A and U
    floor: float  # relative floor of every factor: rounding_floor of the dtype it is summed in


@dataclass
class KronLayer:
    """One SM layer: [reshapes] affine [activation] [max pooling]; what the forward and the
    backward leave of it for the update."""

    affine: nn.Linear | nn.Conv2d
    activation: nn.Module | None = None
    pool: nn.MaxPool2d | None = None
    first: nn.Module | None = None  # the module whose input is the layer's (None: affine)
    data_input: bool = False  # stage 0's first layer: its input is data (no Δ term, U = 0)
    gram: bool = False  # a data layer bounded by max m·Z̃ᵀZ̃ (sm_kron's input_bound: gram)
    offsets: bool = False  # a convolution's A bounded per kernel offset (conv_factor: offsets)
    # What each microbatch's backward keeps for A and U. A Linear layer below another keeps
    # its inputs and LinearSamples (`samples`): its backward computes only the λ it sends
    # down, which the next stage's backward waits for, and its weights of A and U are formed
    # in the update, off the drain's critical path (7 backwards in a row on 4 stages and 4
    # microbatches). A first layer keeps its rows and weights (`pending`). A convolution's
    # rows would be its patches, k² times its input: its backward forms each microbatch's
    # share at once from a few samples' patches at a time (`formed`, conv_factor_shares).
    samples: list[tuple[Tensor, LinearSamples, Tensor]] = field(default_factory=list)
    pending: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]] = field(
        default_factory=list)
    formed: tuple[Tensor, Tensor | None] | None = None
    max_theta: float = 0.0  # max over samples of m_k (the data layer's A ⪯ max m·Z̃ᵀZ̃)
    gram_inverse: Tensor | None = None  # the batch's damped Z̃ᵀZ̃, inverted (gram)
    spectral_sq: float | None = None  # ‖W₀‖₂² of this iteration's weights, once computed
    a_basis: Eigenbasis | None = None  # kept for a stale-basis bound between refreshes
    u_basis: Eigenbasis | None = None
    lam_start: dict[int, Tensor] = field(default_factory=dict)  # λ's power vectors, warm

    @property
    def params(self) -> list[Tensor]:
        return [p for p in (self.affine.weight, self.affine.bias) if p is not None]

    def terms(self, inputs: Tensor, pre: Tensor, grad_out: Tensor, c: Tensor) -> LayerTerms:
        """The bound's per-sample terms of this Linear layer around what the forward stored."""
        w, b = self.affine.weight.detach(), self.affine.bias
        b = None if b is None else b.detach()
        below = not self.data_input
        if below:
            self._spectral()
        return linear_layer_terms(inputs, w, b, grad_out, c, self.activation, pre=pre,
                                  spectral_sq=self.spectral_sq, below=below,
                                  rows=not self.gram)

    def _spectral(self) -> float:
        """‖W₀‖₂² of this iteration's weights: they change only at the update."""
        if self.spectral_sq is None:
            w = self.affine.weight.detach()
            self.spectral_sq = spectral_norm_sq(w.reshape(w.shape[0], -1))
        return self.spectral_sq

    def backward(self, j: int, inputs: Tensor, pre: Tensor, out: Tensor, grad_out: Tensor,
                 c: Tensor, rounds: int, damping: Damping, dtype: torch.dtype,
                 generator: torch.Generator, indices: Tensor | None = None) -> Tensor | None:
        """Keep microbatch j's share of the layer's bound for the update; the curvature c
        its input gets (None: a first layer, whose input is data). `out`: the layer's output;
        `indices`: its max pooling's, as the forward found them (pool_indices)."""
        n = inputs.shape[0]
        if self.gram:  # only max m is needed, and it is cheaper than the terms
            if isinstance(self.affine, nn.Linear):
                theta = largest_curvature(pre.reshape(n, -1).to(inputs.dtype), grad_out, c,
                                          self.activation)
            else:
                theta = conv_largest_curvature(pre.to(inputs.dtype), out, c, self.activation,
                                               self.pool)
            if theta is not None:
                self.max_theta = max(self.max_theta, theta)
                return None
        if isinstance(self.affine, nn.Conv2d):
            return self._conv_backward(j, inputs, pre, grad_out, c, indices, rounds, damping,
                                       dtype, generator)
        if isinstance(self.affine, nn.Linear) and not self.data_input and rounds > 0:
            samples = linear_samples(pre.reshape(n, -1).to(inputs.dtype), grad_out, c,
                                     self.activation)
            lam = self._lambda_estimate(j, inputs, samples.root(), rounds, generator)
            c_below, delta = _damped(lam, damping)
            self.samples.append((inputs, samples.kept(), delta))
            return c_below
        terms = self.terms(inputs, pre, grad_out, c)
        c_below = delta = None
        if not self.data_input:
            c_below, delta = self.curvature_below(j, inputs, terms, rounds, damping, generator)
        self.accumulate(terms, delta, damping.eta)
        return c_below

    def _conv_backward(self, j: int, inputs: Tensor, pre: Tensor, grad_out: Tensor, c: Tensor,
                       indices: Tensor | None, rounds: int, damping: Damping,
                       dtype: torch.dtype, generator: torch.Generator) -> Tensor | None:
        """backward for a convolution: its terms per output pixel, λ and δ, and microbatch
        j's share of A and U formed at once (conv_factor_shares), a few samples at a time
        (each per-pixel term is the pre-activation's size, and several are alive at once)."""
        geometry, bias, below = ConvGeometry.of(self.affine), self.affine.bias, not self.data_input
        weight = self.affine.weight.detach()
        start = self.lam_start.get(j) if below and rounds > 0 else None
        if start is not None and start.shape != inputs.shape:
            start = None
        sent, vectors = [], []
        block = max(1, _PIXEL_ENTRIES // max(1, pre[0].numel()))
        for first in range(0, inputs.shape[0], block):
            part = slice(first, first + block)
            pixels = conv_pixel_terms(
                inputs[part], weight, None if bias is None else bias.detach(), grad_out[part],
                c[part], geometry, self.activation, self.pool, pre=pre[part],
                indices=None if indices is None else indices[part],
                spectral_sq=self._spectral() if below else None, below=below,
                lam_bound=rounds == 0)
            self.max_theta = max(self.max_theta, float(pixels.theta.max()))
            delta = None
            if below:
                lam = pixels.lam_bound
                if rounds > 0:
                    lam, reached = conv_lambda_estimate(
                        weight, pixels.size(), geometry, inputs[part].shape, rounds,
                        None if start is None else start[part].to(inputs.dtype), generator)
                    vectors.append(reached)
                assert lam is not None
                c_below, delta = _damped(lam, damping)
                sent.append(c_below)
            if not self.gram:
                self._add_conv_share(inputs[part], pixels, delta, geometry, damping.eta, dtype)
        if vectors:  # kept between iterations, the microbatch's input size: half precision
            self.lam_start[j] = torch.cat(vectors).to(torch.float16)  # (any start is one)
        return torch.cat(sent) if sent else None

    def _add_conv_share(self, inputs: Tensor, pixels: ConvPixels, delta: Tensor | None,
                        geometry: ConvGeometry, eta: float, dtype: torch.dtype) -> None:
        a_weights, u_weights = row_weights(pixels.theta, pixels.cross, pixels.coverage, delta,
                                           eta)
        a, u = conv_factor_shares(inputs, pixels.cotangents, a_weights, u_weights, geometry,
                                  self.affine.bias is not None, dtype, self.offsets)
        if self.formed is not None:
            a = self.formed[0].add_(a)
            u = None if u is None or self.formed[1] is None else self.formed[1].add_(u)
        self.formed = (a, u)

    def rows(self, inputs: Tensor) -> Tensor:
        """The rows z̃ of the layer's inputs (patches for a convolution), in their dtype."""
        with_bias = self.affine.bias is not None
        if isinstance(self.affine, nn.Conv2d):
            return fold_bias(conv_patches(inputs, ConvGeometry.of(self.affine)), with_bias)
        return fold_bias(inputs.reshape(inputs.shape[0], -1), with_bias)

    def prepare_gram(self, inputs: list[Tensor], damping: Damping, block: int = 0) -> None:
        """Factor the batch's Z̃ᵀZ̃ (a data layer with the gram bound), summed `block` samples
        at a time (0: a microbatch at a time): it needs the forward only, so stage 0 does it
        before its first backward arrives."""
        self.gram_inverse = None  # the last batch's, freed before this one is formed

        def damped_gram(floor: float) -> Tensor:  # formed again only if Cholesky refuses it
            gram = summed_input_gram(inputs, self.rows, block)
            # float64: damped in its own storage, one d² matrix alive, then its factor
            return damped_factor(gram, damping.factor, floor, in_place=True)

        self.gram_inverse = floored_inverse(damped_gram, damping.floor)

    def curvature_below(self, j: int, inputs: Tensor, terms: LayerTerms, rounds: int,
                        damping: Damping, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(c sent below, δ) of microbatch j: λ_k by a few warm-started power rounds from
        below (the note's δ_k = delta_rel·λ_k + delta_abs, c_k = λ_k + δ_k), or with no rounds
        the certified bound of the terms, which is safe but larger."""
        if rounds == 0:
            assert terms.lam_bound is not None
            lam = terms.lam_bound
        else:
            lam = self._lambda_estimate(j, inputs, terms_root(terms), rounds, generator)
        return _damped(lam, damping)

    def _lambda_estimate(self, j: int, inputs: Tensor, root: Tensor, rounds: int,
                         generator: torch.Generator) -> Tensor:
        """A Linear layer's λ by power rounds warm-started from microbatch j's last vectors;
        `root` is |M|^½ (LinearSamples.root, terms_root)."""
        start = self.lam_start.get(j)
        if start is not None and start.shape[0] != inputs.shape[0]:
            start = None
        lam, vectors = linear_lambda_estimate(self.affine.weight.detach(), root, rounds, start,
                                              generator)
        self.lam_start[j] = vectors
        return lam

    def accumulate(self, terms: LayerTerms, delta: Tensor | None, eta: float) -> None:
        """Keep a microbatch's share of A and U (sums over samples): its rows and weights; with
        the gram bound only max m is needed of it."""
        self.max_theta = max(self.max_theta, float(terms.theta_curvature.max()))
        if self.gram:
            return
        a_weights, u_weights = factor_weights(terms, None if self.data_input else delta, eta)
        u_rows = None if u_weights is None else terms.cotangents
        self.pending.append((terms.inputs, a_weights, u_rows, u_weights))

    def factors(self, dtype: torch.dtype, eta: float) -> tuple[Tensor, Tensor | None]:
        """A and U of the microbatches since the last step, summed in `dtype` in their order
        (the formed shares first, then the kept rows'); what was kept is let go."""
        assert self.pending or self.formed or self.samples, "no backward since the last step"
        a, u = self.formed if self.formed is not None else (None, None)
        kept, self.samples = self.samples, []
        # One microbatch's rows at a time: a Linear layer's are made here from what it kept.
        rows_of = (self._rows_of(*samples, eta) for samples in kept)
        for rows, a_weights, u_rows, u_weights in itertools.chain(self.pending, rows_of):
            share = weighted_gram(rows, a_weights, dtype)
            a = share if a is None else a.add_(share)
            if u_rows is not None and u_weights is not None:
                share = weighted_gram(u_rows, u_weights, dtype)
                u = share if u is None else u.add_(share)
        assert a is not None
        self.pending, self.formed = [], None
        return a, u

    def _rows_of(self, inputs: Tensor, samples: LinearSamples, delta: Tensor,
                 eta: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """A microbatch's rows and weights of A and U from what a Linear layer's backward kept."""
        terms = linear_terms_of(inputs, samples, self.affine.weight.detach(),
                                self.affine.bias is not None, spectral_sq=self._spectral())
        a_weights, u_weights = factor_weights(terms, delta, eta)
        return terms.inputs, a_weights, terms.cotangents, u_weights

    def step(self, damping: Damping, refresh: bool,
             dtype: torch.dtype) -> tuple[dict[int, Tensor], float]:
        """The bound's minimiser for this layer's gradient (in .grad), by parameter id, and
        its model value ½⟨G, V⟩ (the bound's predicted change of the loss); the factors are
        summed in `dtype`."""
        weight, bias = self.affine.weight, self.affine.bias
        grad = weight_matrix(weight.grad, None if bias is None else bias.grad).to(DTYPE)
        if self.data_input:  # U = 0: one solve, no eigendecomposition
            change = self._input_step(grad, damping, dtype)
            value = 0.5 * float((grad * change).sum())
        else:
            a_factor, u_factor = self.factors(dtype, damping.eta)
            assert u_factor is not None, "an inner layer has U"
            a_damped = damped_factor(a_factor, damping.factor, damping.floor)
            self.a_basis = _basis(a_damped, self.a_basis, refresh)
            u_damped = damped_factor(u_factor, damping.factor, damping.floor)
            self.u_basis = _basis(u_damped, self.u_basis, refresh)
            change = kronecker_step(grad, self.a_basis, self.u_basis)
            value = kronecker_model_value(grad, change, self.a_basis, self.u_basis)
        dw, db = split_weight_matrix(change, weight.shape, bias is not None)
        steps = {id(weight): dw.to(weight.dtype)}
        if bias is not None and db is not None:
            steps[id(bias)] = db.to(bias.dtype)
        self.pending, self.formed, self.samples = [], None, []
        self.max_theta, self.spectral_sq = 0.0, None
        return steps, value

    def _input_step(self, grad: Tensor, damping: Damping, dtype: torch.dtype) -> Tensor:
        if self.gram:
            assert self.gram_inverse is not None, "the batch's Gram matrix was not prepared"
            if self.max_theta <= 0.0:  # no curvature in any sample: the bound has no minimiser
                return torch.zeros_like(grad)
            return input_layer_step(grad, self.gram_inverse, self.max_theta)
        a_factor, _ = self.factors(dtype, damping.eta)
        inverse = floored_inverse(
            lambda floor: damped_factor(a_factor, damping.factor, floor), damping.floor)
        return input_layer_step(grad, inverse)


def _damped(lam: Tensor, damping: Damping) -> tuple[Tensor, Tensor]:
    """(c sent below, δ) from λ, with the optimizer's δ options."""
    return damped_curvature(lam, delta_rel=damping.delta_rel, delta_abs=damping.delta_abs,
                            delta_floor=damping.delta_floor)


def _basis(factor: Tensor, previous: Eigenbasis | None, refresh: bool) -> Eigenbasis:
    """A fresh eigendecomposition, or the bound in the previous basis between refreshes."""
    if refresh or previous is None or previous.vectors.shape != factor.shape:
        return fresh_eigenbasis(factor)
    return stale_eigenbasis(factor, previous.vectors)


def stage_layers(module: nn.Module, first_stage: bool, input_gram_bound: bool = False,
                 conv_offsets: bool = False) -> list[KronLayer] | None:
    """The stage's SM layers, in order, or None when a module of it has no Kronecker bound
    here (attention, normalisation, embeddings, average pooling, two activations in a row):
    such a stage keeps SM's inner loop on its exact local loss. `conv_offsets`: each
    convolution's A bounded per kernel offset (sm_kron's conv_factor: offsets)."""
    leaves = _leaves(module)
    if leaves is None:
        return None
    layers: list[KronLayer] = []
    pending: list[nn.Module] = []  # reshapes before the next affine layer
    for leaf in leaves:
        if isinstance(leaf, nn.Identity):
            continue
        if isinstance(leaf, (nn.Linear, nn.Conv2d)):
            if isinstance(leaf, nn.Conv2d) and not ConvGeometry.covers(leaf):
                return None
            layers.append(KronLayer(leaf, first=pending[0] if pending else None,
                                    offsets=conv_offsets))
            pending = []
        elif isinstance(leaf, nn.Flatten):
            pending.append(leaf)
        elif not layers or pending or not _follows(layers[-1], leaf):
            return None
    if not layers or pending:
        return None
    layers[0].data_input = first_stage
    layers[0].gram = first_stage and input_gram_bound
    return layers


def _follows(layer: KronLayer, leaf: nn.Module) -> bool:
    """Take `leaf` into `layer` if it can follow what the layer holds: one elementwise
    activation, then (after a convolution) one max pooling."""
    if isinstance(leaf, ACTIVATIONS) and layer.activation is None and layer.pool is None:
        layer.activation = leaf
        return True
    if (isinstance(leaf, nn.MaxPool2d) and layer.pool is None
            and isinstance(layer.affine, nn.Conv2d)):
        layer.pool = leaf
        return True
    return False


def _leaves(module: nn.Module) -> list[nn.Module] | None:
    """The leaf modules of nested Sequentials in forward order (None: another container)."""
    if type(module) is nn.Sequential:
        found: list[nn.Module] = []
        for child in module:
            inner = _leaves(child)
            if inner is None:
                return None
            found += inner
        return found
    if next(module.children(), None) is not None:
        return None
    if any(p.requires_grad for p in module.parameters()) and not isinstance(
            module, (nn.Linear, nn.Conv2d)):
        return None
    return [module]
