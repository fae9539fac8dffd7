"""Rounding-error bounds of LeNet5V1's float32 forward and training step (test_native's parity).

The reference is the PyTorch path in float64: the same model, inputs, dropout mask, loss and
optimiser. Each float32 implementation of it, torch's own as much as the native step, must lie
within a bound of that reference derived from float32 rounding alone, element by element, so
that the bound holds for every vector width, summation order, FMA contraction and compiler.

The bound is a running error analysis: stage by stage, what the error already in the inputs can
do through the stage, plus the stage's own rounding.

- Own rounding: a few units of float32 rounding U of each element-wise result, and for a sum of
  n terms, in any order, gamma(n) = LAMBDA sqrt(n) U times the sum of the terms' magnitudes
  (Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
  Comput. 41, 2019: exceeded with probability below 2 exp(-LAMBDA^2 / 2), 3e-8 for LAMBDA = 6,
  per element, rounding errors being independent and as likely up as down; the deterministic
  (n - 1) U is sqrt(n) times looser, 224 times for conv1's weight gradient).
- Errors carried in: through an element-wise function f, |f'| e; through a sum of w_k x_k,
  sqrt(sum w_k^2 e(x_k)^2), under the same model: the inputs' errors come from different
  roundings, so they add as a random walk, not in line (in line, each layer would multiply the
  bound by its weights' absolute row sums, 6 to 20 here, and the logits' bound would reach 1).
  Errors shared by many elements add in line instead. In the backward, batch norm's means of
  dh and dh xhat (and k = w istd) are one value per channel: their bounds are carried as a
  second, shared part of each bound, in line through every sum after them (a ReLU gate flipped
  at one pixel moves those means, hence every pixel's dz, the same way: summed over 6400
  pixels by conv2's weight gradient, far more than a random walk), and so is a max-pooling
  block's gradient that rounding may route to another of its pixels (it leaves one and arrives
  at the other). In the forward, the statistics' own error is followed in line where it meets
  a sum over its channel (it cancels in the variance, whose deviations sum to 0; it moves the
  backward's sums by its size times theirs) and carried like any other error after that: its
  bound, that of a float32 sum of the whole batch in any order, is hundreds of times what
  either path's float64 accumulation makes.

Where rounding can flip a decision (a ReLU input within its bound of 0, another value of a max
pooling block within the bounds of the block's maximum), the bound adds the whole gradient the
other choice would route. Adam divides by the gradient's own scale: its update's bound is the
gradient's bound times the update's slope, capped by twice the largest step Adam can take.
Each line below names the rule it applies.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lenetlab.model import LeNet5V1, _batch_norm, _layers

U = 2.0 ** -24  # float32's unit roundoff: one rounding moves a value by at most U times it
LAMBDA = 6.0
TANH_ERR = 2e-7  # each path's float32 tanh is within this of tanh, any input (test_tanh_is_accurate)
D = torch.float64


def gamma(n: int) -> float:
    """The relative bound of a float32 sum of n terms in any order (LAMBDA sqrt(n) U)."""
    return LAMBDA * math.sqrt(n) * U


def _rss(t):
    """sqrt of a sum of squared bounds: errors of different terms are independent (see above)."""
    return t.sqrt()


def _per_channel(t):
    return t.sum((0, 2, 3)) if t.dim() == 4 else t.sum(0)


def _spread(v, like):
    return v.view(1, -1, 1, 1) if like.dim() == 4 else v


def _up(t):
    """Each value of a 2x2-pooled map over its block."""
    return t.repeat_interleave(2, 2).repeat_interleave(2, 3)


def _keep(t):
    if t.requires_grad:
        t.retain_grad()
    return t


class _Act:
    """a = act(h), with h's bound e_h: a's bound, and the backward's."""

    def __init__(self, relu: bool, h, e_h):
        self.relu, self.h, self.e_h = relu, h, e_h
        self.a = torch.relu(h) if relu else torch.tanh(h)
        if relu:
            # exact and 1-Lipschitz; below -e(h) the output is 0 in every path
            self.e = torch.where(h > -e_h, e_h, torch.zeros_like(e_h))
        else:
            # tanh' <= 1, and each path's own float32 tanh is within TANH_ERR
            self.e = (1 - self.a ** 2) * e_h + TANH_ERR

    def backward(self, da, e_da, shared=None):
        """The bounds of dh = da act'(a): (its own, the shared part: see _Errors)."""
        if self.relu:
            gate = (self.h > 0).to(D)
            flip = ((self.h.abs() <= self.e_h) & (self.e_h > 0)).to(D)
            # a gate rounding may flip passes all of da (with its error) or none of it
            own = torch.maximum(gate, flip) * e_da + flip * da.abs()
            return own, None if shared is None else torch.maximum(gate, flip) * shared
        # 1 - a^2 from the output a: its error 2|a| e(a), and two roundings
        own = (1 - self.a ** 2) * e_da + da.abs() * (2 * self.a.abs() * self.e + 2 * U)
        return own, None if shared is None else (1 - self.a ** 2) * shared


class _Pool:
    """p = 2x2 pooling of a (B, C, H, W), with a's bound e_a: p's bound, and the backward's."""

    def __init__(self, is_max: bool, a, e_a):
        self.max, self.shape = is_max, a.shape
        if not is_max:
            self.p = F.avg_pool2d(a, 2)
            # a sum of 4, then 1/4 (exact)
            self.e = F.avg_pool2d(e_a, 2) + gamma(4) * F.avg_pool2d(a.abs(), 2)
            return
        self.p, self.idx = F.max_pool2d(a, 2, return_indices=True)
        self.e = F.max_pool2d(e_a, 2)  # the max moves by at most the largest error in its block
        winner = F.max_unpool2d(torch.ones_like(self.p), self.idx, 2, output_size=a.shape[2:]) > 0
        top = _up(self.p)
        e_top = _up(e_a.flatten(2).gather(2, self.idx.flatten(2)).view_as(self.p))
        gap = top - a
        # another pixel within rounding of its block's maximum may win in some path; exact ties
        # (equal values with no error, or ReLU zeros that are zeros in every path) go to the
        # first pixel in every path (test_max_pooling_ties_go_to_the_first)
        near = (gap <= e_a + e_top) & ((gap > 0) | ((top == 0) & (e_a + e_top > 0))) & ~winner
        contested = _up(F.max_pool2d(near.to(D), 2)) > 0
        self.moved = (near | (winner & contested)).to(D)

    def backward(self, dp, e_dp, shared=None):
        """The bounds of da = the pooling's gradient of dp: (its own, the shared part)."""
        if not self.max:  # a quarter of each to its 4 pixels: exact
            return _up(e_dp) / 4, None if shared is None else _up(shared) / 4
        own = F.max_unpool2d(e_dp, self.idx, 2, output_size=self.shape[2:])
        # a contested block's gradient may go to any of its contenders, leaving the one it goes
        # to in float64: one error on two pixels, so it is carried in line (shared)
        shared = torch.zeros_like(dp) if shared is None else shared
        moved = self.moved * _up(dp.abs() + e_dp + shared)
        return own, moved + F.max_unpool2d(shared, self.idx, 2, output_size=self.shape[2:])


class _BatchNorm:
    """h = (z - mean) / sqrt(var + eps) * w + b with z's bound e_z, on the batch's statistics
    (training) or the running ones (eval): h's bound, the running statistics', the backward's."""

    def __init__(self, bn, z, e_z, training: bool):
        self.module, self.w, self.b = bn, bn.weight.detach().to(D), bn.bias.detach().to(D)
        self.n = z.numel() // z.shape[1]
        n = self.n
        if training:
            self.mu = _per_channel(z) / n
            self.e_mu = (_rss(_per_channel(e_z ** 2)) + gamma(n) * _per_channel(z.abs())) / n  # a sum of n
            c = z - _spread(self.mu, z)
            self.var = _per_channel(c ** 2) / n
            # a sum of n squares, each rounded; the mean's error, common to all, cancels: sum c = 0
            self.e_var = (_rss(_per_channel((2 * c * (e_z + U * c.abs())) ** 2)) / n
                          + (gamma(n) + U) * self.var)
        else:
            self.mu, self.e_mu = bn.running_mean.to(D), torch.zeros(z.shape[1], dtype=D)
            c = z - _spread(self.mu, z)
            self.var = bn.running_var.to(D)
            self.e_var = U * (self.var + bn.eps)  # var + eps, rounded
        self.istd = (self.var + bn.eps).rsqrt()
        # d v^-1/2 = v^-3/2 / 2; a square root and a division
        self.e_istd = 0.5 * self.istd ** 3 * self.e_var + 2 * U * self.istd
        istd = _spread(self.istd, z)
        self.xhat, self.c = c * istd, c
        # the pixel's own error, and the statistics' (the same for every pixel of the channel)
        self.e_xhat_own = istd * (e_z + U * c.abs()) + U * self.xhat.abs()
        self.e_xhat = self.e_xhat_own + istd * _spread(self.e_mu, z) + c.abs() * _spread(self.e_istd, z)
        w, b = _spread(self.w, z), _spread(self.b, z)
        self.e = w.abs() * self.e_xhat + 2 * U * ((self.xhat * w).abs() + b.abs())  # scale and shift

    def running(self):
        """(running_mean, its bound, running_var, its bound) after the step (momentum m, the
        unbiased variance)."""
        bn = self.module
        m, r = bn.momentum, self.n / (self.n - 1)
        rm, rv = bn.running_mean.to(D), bn.running_var.to(D)
        e_rm = m * self.e_mu + 3 * U * ((1 - m) * rm.abs() + m * self.mu.abs())  # three roundings
        e_rv = m * r * self.e_var + 3 * U * ((1 - m) * rv + m * r * self.var)
        return (1 - m) * rm + m * self.mu, e_rm, (1 - m) * rv + m * r * self.var, e_rv

    def backward(self, dh, e_dh, shared):
        """The bounds of dz = k (dh - mean(dh) - xhat mean(dh xhat)), k = w istd: (its own, the
        shared part), and those of the weight's gradient sum(dh xhat) and the bias's sum(dh)."""
        n, xhat, k = self.n, self.xhat, _spread(self.w * self.istd, dh)
        # sums of n: the independent errors as a random walk, the shared ones in line
        e_sdy = (_rss(_per_channel(e_dh ** 2)) + _per_channel(shared)
                 + gamma(n) * _per_channel(dh.abs()))
        # the statistics' error moves every xhat of the channel alike: this sum by its shift
        # times sum(dh) and its scale times sum(dh c)
        e_sdyx = (_rss(_per_channel((e_dh * xhat) ** 2 + (dh * self.e_xhat_own) ** 2))
                  + _per_channel(shared * xhat.abs())
                  + self.istd * self.e_mu * _per_channel(dh).abs()
                  + self.e_istd * _per_channel(dh * self.c).abs()
                  + gamma(n) * _per_channel((dh * xhat).abs()))
        mdy, mdyx = _spread(_per_channel(dh) / n, dh), _spread(_per_channel(dh * xhat) / n, dh)
        e_mdy, e_mdyx = _spread(e_sdy / n, dh) + U * mdy.abs(), _spread(e_sdyx / n, dh) + U * mdyx.abs()
        inner = dh - mdy - xhat * mdyx
        own = k.abs() * (e_dh + self.e_xhat_own * mdyx.abs()
                         + 3 * U * (dh.abs() + mdy.abs() + (xhat * mdyx).abs())) + U * (k * inner).abs()
        # the channel's means and k are one value for all its pixels: their errors are shared
        e_k = _spread(self.w.abs() * self.e_istd, dh) + U * k.abs()
        common = k.abs() * (shared + e_mdy + xhat.abs() * e_mdyx
                            + (self.e_xhat - self.e_xhat_own) * mdyx.abs()) + e_k * inner.abs()
        return own, common, e_sdyx, e_sdy


def _f32(fn, *tensors, **kwargs):
    """fn (a sum of products) of non-negative tensors, computed in float32 for speed: such a
    sum is within (n - 1) U of itself, well under the 1% added."""
    return fn(*(t.float() if isinstance(t, torch.Tensor) else t for t in tensors), **kwargs).to(D) * 1.01


def _conv_bounds(x, e_x, w, b, pad: int):
    """The bound of conv(x, w) + b: each output sums in channels x 25 taps and the bias."""
    e = gamma(w[0].numel() + 1) * (_f32(F.conv2d, x.abs(), w.abs(), padding=pad) + b.abs().view(1, -1, 1, 1))
    return e if e_x is None else e + _rss(_f32(F.conv2d, e_x ** 2, w ** 2, padding=pad))


def _conv_backward(dz, e_dz, shared, x, e_x, w, pad: int, input_grad: bool):
    """The bounds of a 5x5 convolution's weight and bias gradients and (input_grad) its input
    gradient's (own, shared), from dz's (own e_dz, shared)."""
    n = dz.shape[0] * dz.shape[2] * dz.shape[3]  # a weight's gradient sums over images and pixels

    def wgrad(a, g):
        return _f32(torch.nn.grad.conv2d_weight, a, torch.Size(w.shape), g, padding=pad)

    prop = wgrad(x ** 2, e_dz ** 2)
    if e_x is not None:
        prop = prop + wgrad(e_x ** 2, dz ** 2)
    # each sum: the independent errors as a random walk, the shared ones in line, its own rounding
    e_w = _rss(prop) + wgrad(x.abs(), shared) + gamma(n) * wgrad(x.abs(), dz.abs())
    e_b = _rss(_per_channel(e_dz ** 2)) + _per_channel(shared) + gamma(n) * _per_channel(dz.abs())
    if not input_grad:
        return e_w, e_b, (None, None)
    # an input pixel's gradient sums over output channels x 25 taps
    own = (_rss(_f32(F.conv_transpose2d, e_dz ** 2, w ** 2, padding=pad))
           + gamma(w.shape[0] * 25) * _f32(F.conv_transpose2d, dz.abs(), w.abs(), padding=pad))
    return e_w, e_b, (own, _f32(F.conv_transpose2d, shared, w.abs(), padding=pad))


def _linear_backward(dout, e_dout, x, e_x, w):
    """The bounds of a linear layer's weight, bias and input gradients (dout: (B, out))."""
    batch = dout.shape[0]  # a weight's gradient sums over the batch
    e_w = (_rss((e_dout ** 2).t() @ x ** 2 + (dout ** 2).t() @ e_x ** 2)
           + gamma(batch) * dout.abs().t() @ x.abs())
    e_b = _rss((e_dout ** 2).sum(0)) + gamma(batch) * dout.abs().sum(0)
    # an input's gradient sums over the outputs
    e_in = _rss(e_dout ** 2 @ w ** 2) + gamma(w.shape[0]) * dout.abs() @ w.abs()
    return e_w, e_b, e_in


class _Pass:
    """The float64 forward of model on x (dropout scale keep / (1 - p) or None), differentiable,
    with every intermediate the bounds need and the bound of each."""

    def __init__(self, model: LeNet5V1, x, scale, training: bool):
        L = self.layers = _layers(model)
        self.model, self.training = model, training
        self.params = {name: p.detach().to(D).requires_grad_(training)
                       for name, p in model.named_parameters()}
        self.name = {id(p): name for name, p in model.named_parameters()}
        relu, is_max = model.activation == "relu", model.pool == "max"
        self.x = h = x.detach().to(D)
        e_h = None
        self.stages = []
        for conv, bn, pad in ((L.conv1, L.bn1, 2), (L.conv2, L.bn2, 0)):
            w, b = self._p(conv.weight), self._p(conv.bias)
            e_z = _conv_bounds(h, e_h, w.detach(), b.detach(), pad)
            z = _keep(F.conv2d(h, w, b, padding=pad))
            norm = None
            if bn is not None:
                norm = _BatchNorm(bn, z.detach(), e_z, training)
                h_bn = self._batch_norm(z, bn, norm)
            pre = _keep(h_bn if bn is not None else z)
            act = _Act(relu, pre.detach(), norm.e if norm is not None else e_z)
            a = _keep(torch.relu(pre) if relu else torch.tanh(pre))
            pool = _Pool(is_max, act.a, act.e)
            p = _keep(F.max_pool2d(a, 2) if is_max else F.avg_pool2d(a, 2))
            self.stages.append(dict(conv=conv, bn=bn, pad=pad, input=h, e_input=e_h, z=z, norm=norm,
                                    pre=pre, act=act, a=a, pool=pool, p=p))
            h, e_h = p, pool.e
        h, e_h = _keep(h.flatten(1)), e_h.flatten(1)
        self.feat = h
        self.dense = []
        for i, fc in enumerate((L.fc1, L.fc2, L.fc3)):
            w, b = self._p(fc.weight), self._p(fc.bias)
            wa = w.detach().abs()
            # a sum of the inputs and the bias
            e_out = (_rss(e_h ** 2 @ wa.t() ** 2)
                     + gamma(w.shape[1] + 1) * (h.detach().abs() @ wa.t() + b.detach().abs()))
            out = F.linear(h, w, b)
            drop = None
            if i == 0 and scale is not None:
                drop = scale.to(D)
                out, e_out = out * drop, e_out * drop  # times 0 or 1 / (1 - p) = 2: exact
            out = _keep(out)
            stage = dict(fc=fc, input=h, e_input=e_h, out=out, drop=drop, act=None)
            self.dense.append(stage)
            if i < 2:
                stage["act"] = act = _Act(relu, out.detach(), e_out)
                h, e_h = _keep(torch.relu(out) if relu else torch.tanh(out)), act.e
                stage["a"] = h
            else:
                self.logits, self.e_logits = out, e_out

    def _p(self, t):
        return self.params[self.name[id(t)]]

    def _batch_norm(self, z, bn, norm: _BatchNorm):
        dims = (0, 2, 3)
        if self.training:
            mu = z.mean(dims, keepdim=True)
            var = ((z - mu) ** 2).mean(dims, keepdim=True)
        else:
            mu, var = norm.mu.view(1, -1, 1, 1), norm.var.view(1, -1, 1, 1)
        w, b = self._p(bn.weight).view(1, -1, 1, 1), self._p(bn.bias).view(1, -1, 1, 1)
        return (z - mu) * (var + bn.eps).rsqrt() * w + b


def forward(model: LeNet5V1, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits of x in float64 and the bound of a float32 path's (batch norm on the
    running statistics, no dropout)."""
    with torch.no_grad():
        s = _Pass(model, x, None, training=False)
    return s.logits, s.e_logits + U * s.logits.abs()  # + the float32 result's own rounding


class Gradients(NamedTuple):
    """A float64 forward and backward: each parameter's gradient and its bound, by name, and
    the batch norms' buffers after the step ({state_dict key: (value, bound or None: exact)})."""

    values: dict
    bounds: dict
    buffers: dict


def _target(y, smoothing: float) -> torch.Tensor:
    """The loss's target in float64, smoothed as F.cross_entropy smooths it: of labels y (B,),
    or of soft targets y (B, 10) (mixup's and CutMix's: lam onehot(y_i) + (1 - lam) onehot(y_j))."""
    target = y.to(D) if y.is_floating_point() else F.one_hot(y, 10).to(D)
    return target * (1 - smoothing) + smoothing / 10


def gradients(model: LeNet5V1, x, y, scale=None, smoothing: float = 0.0) -> Gradients:
    """The training-mode forward, the loss and the backward in float64, with the bounds of a
    float32 path's gradients (model is left unchanged); y: labels, or soft targets (B, 10)."""
    s = _Pass(model, x, scale, training=True)
    soft = y.is_floating_point()
    F.cross_entropy(s.logits, y.to(D) if soft else y, label_smoothing=smoothing).backward()
    e_grad = {}
    with torch.no_grad():
        lg, e_lg, batch = s.logits.detach(), s.e_logits, len(y)
        p = torch.softmax(lg, 1)
        target = _target(y, smoothing)
        lse = torch.logsumexp(lg, 1, keepdim=True)
        # softmax: dp_i = p_i (dz_i - sum_j p_j dz_j); its own rounding: exp (relative, also of
        # its argument, up to |z| + |lse|), a sum of 10, a division
        e_p = (p * (e_lg + (p * e_lg).sum(1, keepdim=True))
               + p * (gamma(10) + 4 * U + 2 * U * (lg.abs() + lse.abs())))
        e_d = e_p / batch + 3 * U * (p + target) / batch  # (p - target) / B: three roundings
        if soft:
            # a float32 path's soft target: 1 - lam, the sum of the two one-hot terms, the
            # smoothing's product and sum (4 roundings); torch's backward of -sum t log_softmax
            # also multiplies p by the sum of its target, 1 within a sum of 10's rounding
            e_d = e_d + (4 * U * target + gamma(10) * p * target.sum(1, keepdim=True)) / batch
        for stage in reversed(s.dense):
            if stage["act"] is not None:  # e_d is the bound at act(out): through the activation
                e_d, _ = stage["act"].backward(stage["a"].grad, e_d)
                if stage["drop"] is not None:
                    e_d = e_d * stage["drop"]  # exact
            fc, d_out = stage["fc"], stage["out"].grad
            if stage["drop"] is not None:
                d_out = d_out * stage["drop"]  # the gradient at fc1's output, before the dropout scale
            e_grad[fc.weight], e_grad[fc.bias], e_d = _linear_backward(
                d_out, e_d, stage["input"].detach(), stage["e_input"], fc.weight.detach().to(D))
        # the feature maps: each bound in two parts, its own (independent of other elements') and
        # the part shared by a whole channel (errors of batch norm's per-channel backward sums)
        e_d = e_d.view(s.stages[1]["p"].shape)
        shared = torch.zeros_like(e_d)
        for stage in reversed(s.stages):
            e_da, shared = stage["pool"].backward(stage["p"].grad, e_d, shared)
            e_dz, shared = stage["act"].backward(stage["a"].grad, e_da, shared)
            bn = stage["bn"]
            if bn is not None:
                e_dz, shared, e_grad[bn.weight], e_grad[bn.bias] = stage["norm"].backward(
                    stage["pre"].grad, e_dz, shared)
            conv, first = stage["conv"], stage is s.stages[0]
            e_grad[conv.weight], e_grad[conv.bias], (e_d, shared) = _conv_backward(
                stage["z"].grad, e_dz, shared, stage["input"].detach(), stage["e_input"],
                conv.weight.detach().to(D), stage["pad"], not first)
        buffers = {}
        for stage in s.stages:
            if stage["bn"] is not None:
                prefix = next(name for name, m in model.named_modules() if m is stage["bn"])
                rm, e_rm, rv, e_rv = stage["norm"].running()
                buffers[f"{prefix}.running_mean"], buffers[f"{prefix}.running_var"] = (rm, e_rm), (rv, e_rv)
                buffers[f"{prefix}.num_batches_tracked"] = (stage["bn"].num_batches_tracked + 1, None)
    names = {id(p): name for name, p in model.named_parameters()}
    return Gradients({name: s.params[name].grad for name in s.params},
                     {names[id(p)]: e for p, e in e_grad.items()}, buffers)


def step(model: LeNet5V1, optimizer: torch.optim.Optimizer, x, y, scale=None, smoothing: float = 0.0,
         grads: Gradients | None = None) -> dict:
    """One training step in float64 from model's and optimizer's state (both left unchanged):
    {key: (float64 value, the bound of a float32 path's)} over model.state_dict()'s keys and the
    optimiser's state as "parameter name:state key". grads: gradients(model, x, y, scale,
    smoothing) if already computed (it does not depend on the optimiser)."""
    grads = grads or gradients(model, x, y, scale, smoothing)
    with torch.no_grad():
        out = {**_update(model, optimizer, grads), **grads.buffers}
    # + the float32 result's own rounding; None: exact (counters)
    return {k: (v, torch.zeros(v.shape, dtype=D) if e is None else e + U * v.abs())
            for k, (v, e) in out.items()}


def _update(model, optimizer, grads: Gradients) -> dict:
    """torch's optimiser step on float64 copies of the parameters, with grads' gradients, and
    each parameter's and state tensor's bound: {key: (value, bound)}."""
    group = optimizer.param_groups[0]
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().to(D).clone() for p in model.parameters()]
    for p, name in zip(params, names):
        p.grad = grads.values[name].clone()
    before = [p.clone() for p in params]
    opt = type(optimizer)(params, lr=group["lr"])
    opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # the hyperparameters, the state in float64
    state0 = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    opt.step()
    lr, wd, out = group["lr"], group["weight_decay"], {}
    for name, p, p0, st0 in zip(names, params, before, state0):
        e_g, g, st = grads.bounds[name], p.grad, opt.state[p]
        if isinstance(optimizer, torch.optim.SGD):
            mom, buf0 = group["momentum"], st0.get("momentum_buffer")
            d, buf = g + wd * p0, st["momentum_buffer"]
            e_buf = e_g + 3 * U * (g.abs() + wd * p0.abs())  # d = g + wd p, wd rounded to float32 too
            if buf0 is not None:
                e_buf = e_buf + 3 * U * (mom * buf0.abs() + d.abs())  # mom buf + d (the first: d itself)
            out[f"{name}:momentum_buffer"] = (buf.clone(), e_buf)
            out[name] = (p.detach().clone(), lr * e_buf + 3 * U * (p0.abs() + lr * buf.abs()))  # p - lr buf
            continue
        decoupled = group.get("decoupled_weight_decay") or isinstance(optimizer, torch.optim.AdamW)
        (b1, b2), eps = group["betas"], group["eps"]
        w1, w2, t = 1 - b1, 1 - b2, float(st["step"])
        c, bc2s = lr / (1 - b1 ** t), math.sqrt(1 - b2 ** t)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m0, v0 = st0.get("exp_avg", torch.zeros_like(m)), st0.get("exp_avg_sq", torch.zeros_like(v))
        gg, e_gg = g, e_g
        if not decoupled:
            gg, e_gg = g + wd * p0, e_g + 3 * U * (g.abs() + wd * p0.abs())  # the L2 term: g + wd p
        e_m = w1 * e_gg + 3 * U * (b1 * m0.abs() + w1 * gg.abs())  # b1 m + (1 - b1) g
        e_v = w2 * (2 * gg.abs() * e_gg + e_gg ** 2) + 3 * U * (b2 * v0 + w2 * gg ** 2)  # b2 v + (1 - b2) g^2
        # the step c m / (sqrt(v) / bc2s + eps), a function of g: over g +- e(g) its slope is at
        # most c (w1 / den + |m| sqrt(w2) / (bc2s den^2)), den and |m| at their worst there ...
        den = (b2 * v0 + w2 * (gg.abs() - e_gg).clamp(min=0) ** 2).sqrt() / bc2s + eps
        m_max = b1 * m0.abs() + w1 * (gg.abs() + e_gg)
        slope = c * (w1 / den + m_max * math.sqrt(w2) / (bc2s * den ** 2))
        # ... and no path steps further than adam_step_cap: the difference is at most twice that
        cap = adam_step_cap(lr, (b1, b2), round(t))
        update = c * m / (v.sqrt() / bc2s + eps)
        # + its own ~6 roundings and those of m and v
        e_u = torch.clamp(slope * e_gg, max=2 * cap) + 10 * U * update.abs()
        shrink = 1 - lr * wd if decoupled else 1.0
        # p (1 - lr wd) - step
        out[name] = (p.detach().clone(), e_u + 3 * U * (shrink * p0.abs() + update.abs()))
        out[f"{name}:exp_avg"], out[f"{name}:exp_avg_sq"] = (m.clone(), e_m), (v.clone(), e_v)
        out[f"{name}:step"] = (st["step"].clone(), None)
    return out


def forward64(model: LeNet5V1, x, scale=None):
    """fast_forward's arithmetic in float64 (torch's own float64 kernels) on a float64 model:
    training mode updates the batch norms' running statistics, as it does."""
    L = _layers(model)
    relu = model.activation == "relu"
    act = torch.relu if relu else torch.tanh
    pool = (lambda t: F.max_pool2d(t, 2)) if model.pool == "max" else (lambda t: F.avg_pool2d(t, 2))
    h = x.to(D)
    for conv, bn, pad in ((L.conv1, L.bn1, 2), (L.conv2, L.bn2, 0)):
        h = F.conv2d(h, conv.weight, conv.bias, padding=pad)
        if bn is not None:
            h = _batch_norm(h, bn, model.training)
        h = pool(act(h))
    h = F.linear(h.flatten(1), L.fc1.weight, L.fc1.bias)
    if scale is not None and model.training:
        h = h * scale.to(D)
    h = act(F.linear(act(h), L.fc2.weight, L.fc2.bias))
    return F.linear(h, L.fc3.weight, L.fc3.bias)


def train64(model: LeNet5V1, optimizer: torch.optim.Optimizer, batches, scales, smoothing: float = 0.0):
    """Copies of model and optimizer in float64, trained on batches (scales: each one's dropout
    scale or None) as the PyTorch path trains: (model, optimizer)."""
    model64 = copy.deepcopy(model).to(D)
    opt = type(optimizer)(model64.parameters(), lr=optimizer.param_groups[0]["lr"])
    opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for (x, y), scale in zip(batches, scales):
        loss = F.cross_entropy(forward64(model64, x, scale), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model64, opt


def adam_step_cap(lr: float, betas: tuple[float, float], t: int) -> float:
    """The farthest Adam's step t can move a weight, whatever its gradients: lr / bc1 * m / (sqrt(v)
    / bc2s) with |m| <= (1 - b1) sqrt(sum_k<t (b1^2 / b2)^k) sqrt(v / (1 - b2)) (Cauchy-Schwarz
    over the gradients so far; lr at the first step)."""
    b1, b2 = betas
    series = sum((b1 * b1 / b2) ** k for k in range(t))
    return lr / (1 - b1 ** t) * math.sqrt(1 - b2 ** t) * (1 - b1) / math.sqrt(1 - b2) * math.sqrt(series)


def adam_reach(lr: float, betas: tuple[float, float], steps: int) -> float:
    """How far apart two runs of Adam can take a weight in `steps` steps (each moves it by at
    most adam_step_cap per step)."""
    return 2 * sum(adam_step_cap(lr, betas, t) for t in range(1, steps + 1))


def nudge(model: torch.nn.Module, seed: int = 11) -> torch.nn.Module:
    """model with every parameter moved one float32 step up or down (at random, seeded), in
    place: a start one rounding away, whose run shows how far rounding alone moves a run."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            up = torch.rand(p.shape, generator=g) < 0.5
            p.copy_(torch.where(up, torch.nextafter(p, torch.tensor(torch.inf, dtype=p.dtype)),
                                torch.nextafter(p, torch.tensor(-torch.inf, dtype=p.dtype))))
    return model


def loss(model: LeNet5V1, x, y, scale=None, smoothing: float = 0.0, labels=None):
    """The training-mode forward's summed cross-entropy in float64 and the bound of a float32
    path's (each image's loss lse(z) - sum t z moves by at most 2 max e(z) for its logits'
    bounds e, plus the roundings of exp, log and the sum of 10; soft targets y (B, 10) add
    those of their 4 roundings, 4 U t |z|, their loss is (sum t) lse(z) - sum t z and a sum
    above 1 scales the bound), and its number of correct argmax predictions (of labels, by
    default y) with how many of them rounding may change (a top-2 gap within their logits'
    bounds)."""
    labels = y if labels is None else labels
    with torch.no_grad():
        s = _Pass(model, x, scale, training=True)
        z, e = s.logits, s.e_logits
        target = _target(y, smoothing)
        lse = torch.logsumexp(z, 1)
        each = lse - (target * z).sum(1)
        bound = 2 * e.max(1).values + (gamma(10) + 4 * U) * (lse.abs() + z.abs().max(1).values)
        if y.is_floating_point():
            bound = bound + 4 * U * (target * z.abs()).sum(1) + 2 * U * lse.abs()
            # F.cross_entropy's sum t (lse - z), for targets that need not sum to 1 (given ones);
            # each logit's error, and lse's roundings, weigh the target's sum
            each = lse * target.sum(1) - (target * z).sum(1)
            bound = bound * target.sum(1).clamp(min=1)
        top2 = z.topk(2, 1)
        e_top = e.gather(1, top2.indices)
        close = (top2.values[:, 0] - top2.values[:, 1]) <= e_top.sum(1)
        correct = int((z.argmax(1) == labels).sum())
    # the batch's sum: its terms' bounds in line, and its own rounding as a float32 sum (torch's
    # mean reduction; the native step sums in float64)
    total = bound.sum().item() + (gamma(len(y)) + U) * each.abs().sum().item()
    return each.sum().item(), total, correct, int(close.sum())
