"""Wasserstein distillation over an LLM vocabulary: :class:`VocabOTLoss`.

Per token n (leading dimensions of the logits flattened to N tokens; tokens whose label is ``ignore_index`` or whose
mask is False dropped):

    p_n = softmax(student_logits_n / tau),  q_n = softmax(teacher_logits_n / tau)     (float32 or float64)
    d_n = S(p_n, q_n) = OT(p_n, q_n) - OT(p_n, p_n)/2 - OT(q_n, q_n)/2      (divergence=True, the default)
          or OT(p_n, q_n)                                                     (divergence=False)
    loss = weight * mean_n d_n      (reduction "mean"; "sum": the sum)

with OT the fixed-iteration Sinkhorn transport cost of :func:`wkd_kernels.sparse_sinkhorn` over one shared sparse
cost [V, V] (e.g. :func:`wkd_kernels.knn_kernel` of the teacher's token embeddings, as WASD does:
github.com/aailab-kaist/WASD). The teacher carries no gradient.

Memory: the tokens are processed in chunks of ``chunk_size``; each chunk's gradient w.r.t. its logits (or, with
:meth:`VocabOTLoss.forward_hidden`, w.r.t. the hidden states and the lm_head weight) is computed in the forward and
kept, so that besides the gradient itself the extra memory is that of one chunk: O(chunk_size V) for the
softmaxes and scalings (times the iterations with ``grad="exact"``), never N x V per iteration. The logits of all
tokens are never formed by :meth:`forward_hidden` (the chunked distillation losses of Liger-Kernel do the same for
KL).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.checks import as_bool, as_int, as_log_domain, as_real
from ..ops.sparse_sinkhorn import EmbeddingCost, SparseCost, sparse_cost, sparse_sinkhorn

__all__ = ["VocabOTLoss"]

_FN = "VocabOTLoss"


def _token_distances(s: Tensor, t: Tensor, K: SparseCost, temperature: float, num_iters: int, eps: float,
                     grad: str, log_domain, divergence: bool, chunk_elements: Optional[int]) -> Tensor:
    """d_n [n] of one chunk of logits s, t [n, V] (already in the compute dtype)."""
    p = F.softmax(s / temperature, dim=1)
    q = F.softmax(t / temperature, dim=1)
    return sparse_sinkhorn(p, q, K, K.reg, num_iters, eps=eps, grad=grad, log_domain=log_domain,
                           divergence=divergence, chunk_elements=chunk_elements).value


class _ChunkedLoss(torch.autograd.Function):
    """Sum over chunks of ``chunk_fn(*chunk inputs)``, the gradients computed chunk by chunk in the forward.

    ``rows``: the inputs split along their first dimension ([N, ...], chunked by ``index``); ``shared``: inputs used
    whole by every chunk (e.g. the lm_head weight), whose gradients accumulate over the chunks."""

    @staticmethod
    def forward(ctx, chunk_fn, index, chunk_size, n_rows, *tensors):
        rows, shared = tensors[:n_rows], tensors[n_rows:]
        needs = [t.requires_grad for t in tensors]
        grads = [torch.zeros_like(t) if need else None for t, need in zip(tensors, needs, strict=True)]
        total = None
        for chunk in (index.split(chunk_size) if index.numel() else ()):
            with torch.enable_grad():
                ins = [t.index_select(0, chunk).detach().requires_grad_(need)
                       for t, need in zip(rows, needs[:n_rows], strict=True)]
                ins += [t.detach().requires_grad_(need) for t, need in zip(shared, needs[n_rows:], strict=True)]
                val = chunk_fn(*ins)
                wanted = [x for x, need in zip(ins, needs, strict=True) if need]
                got = iter(torch.autograd.grad(val, wanted)) if wanted else iter(())
            for k, need in enumerate(needs):
                if not need:
                    continue
                g = next(got)
                if k < n_rows:
                    grads[k].index_copy_(0, chunk, g.to(grads[k].dtype))
                else:
                    grads[k].add_(g.to(grads[k].dtype))
            total = val.detach() if total is None else total + val.detach()
        if total is None:  # no valid token
            total = (rows[0].new_zeros((), dtype=torch.float32) if rows[0].is_floating_point()
                     else torch.zeros((), device=rows[0].device))
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.needs = needs
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        out = [None, None, None, None]
        for need in ctx.needs:
            out.append(next(saved) * grad_out.to(torch.float32 if grad_out.dtype in (torch.float16, torch.bfloat16)
                                                  else grad_out.dtype) if need else None)
        return tuple(out)


class VocabOTLoss(nn.Module):
    """Sinkhorn divergence (or transport cost) between the student's and the teacher's next-token distributions
    over the whole vocabulary, with a shared sparse cost; chunked over tokens (module docstring of
    wkd_kernels/losses/vocab.py for the formula and the memory).

    Args:
        cost: sparse CSR [V, V] cost (:func:`wkd_kernels.knn_kernel` of the teacher's token embeddings, or any
            CSR whose stored entries are the allowed couplings), float32/float64; kept on the module and moved with
            the logits on first use per device/dtype. Or an :class:`EmbeddingCost` (:func:`wkd_kernels.embedding_cost`,
            every coupling, built with this ``reg`` on the logits' device and compute dtype).
        reg: entropic regularisation of K = exp(-cost / reg) (WASD uses 1e-3; the log domain is then chosen
            automatically).
        num_iters: Sinkhorn iterations (WASD: 10).
        temperature: tau > 0 of both softmaxes.
        weight: factor of the loss.
        divergence: the Sinkhorn divergence (default) or the plain transport cost OT(p, q).
        grad: ``"envelope"`` (default, WASD's: dual potentials) or ``"exact"`` (gradient of the fixed iterations;
            keeps 2 num_iters [chunk, V] numbers per problem).
        ignore_index: label marking tokens without a loss (padding, prompt), as in ``F.cross_entropy``.
        chunk_size: tokens per chunk (memory O(chunk_size V)).
        eps: added to the Sinkhorn denominators.
        log_domain: True, False or "auto" (see :func:`wkd_kernels.sparse_sinkhorn`).
        reduction: ``"mean"`` over the kept tokens (0 when none is kept) or ``"sum"``.

    Call: ``loss(student_logits [..., V], teacher_logits [..., V], labels=None [...], mask=None [...])``; or
    :meth:`forward_hidden` with the student's hidden states and lm_head weight instead of its logits.
    """

    def __init__(self, cost: Tensor, reg: float = 1e-3, num_iters: int = 10, temperature: float = 1.0,
                 weight: float = 1.0, *, divergence: bool = True, grad: str = "envelope", ignore_index: int = -100,
                 chunk_size: int = 256, eps: float = 0.0, log_domain: Union[bool, str] = "auto",
                 reduction: str = "mean", chunk_elements: Optional[int] = None):
        super().__init__()
        self.reg = as_real(reg, "reg", _FN)
        if isinstance(cost, EmbeddingCost):
            if cost.reg != self.reg:
                raise ValueError(f"{_FN}: `cost` was prepared with reg = {cost.reg}, the loss has `reg` = {self.reg}")
            prepared, self.cost, self.num_classes = cost, None, cost.size
        else:
            prepared = sparse_cost(cost, self.reg)  # checks cost and reg
            self.cost, self.num_classes = cost, cost.shape[0]
        self.num_iters = as_int(num_iters, "num_iters", _FN)
        if self.num_iters < 1:
            raise ValueError(f"{_FN}: `num_iters` must be >= 1, got {self.num_iters}")
        self.temperature = as_real(temperature, "temperature", _FN)
        if not self.temperature > 0:
            raise ValueError(f"{_FN}: `temperature` must be > 0, got {self.temperature}")
        self.weight = as_real(weight, "weight", _FN)
        self.divergence = as_bool(divergence, "divergence", _FN)
        if grad not in ("exact", "envelope"):
            raise ValueError(f"{_FN}: `grad` must be 'exact' or 'envelope', got {grad!r}")
        self.grad = grad
        self.ignore_index = as_int(ignore_index, "ignore_index", _FN)
        self.chunk_size = as_int(chunk_size, "chunk_size", _FN)
        if self.chunk_size < 1:
            raise ValueError(f"{_FN}: `chunk_size` must be >= 1, got {self.chunk_size}")
        self.eps = as_real(eps, "eps", _FN)
        self.log_domain = as_log_domain(log_domain, _FN)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{_FN}: `reduction` must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.chunk_elements = chunk_elements
        self._prepared = {(prepared.device, prepared.dtype): prepared}

    def extra_repr(self) -> str:
        kind = f"nnz={self.cost.values().numel()}" if self.cost is not None else \
            f"path={self._prepared[next(iter(self._prepared))].path}"
        return (f"num_classes={self.num_classes}, {kind}, reg={self.reg}, "
                f"num_iters={self.num_iters}, temperature={self.temperature}, weight={self.weight}, "
                f"divergence={self.divergence}, grad={self.grad!r}, chunk_size={self.chunk_size}")

    def _kernel(self, device: torch.device, dtype: torch.dtype) -> SparseCost:
        key = (device, dtype)
        if key not in self._prepared:
            if self.cost is None:
                have = next(iter(self._prepared))
                raise ValueError(f"{_FN}: the EmbeddingCost `cost` is on {have[0]} in {have[1]}, the logits need "
                                 f"{device} in {dtype}: build it from embeddings there (wkd_kernels.embedding_cost)")
            c = self.cost.to(device=device, dtype=dtype)
            self._prepared[key] = SparseCost(c, self.reg)
        return self._prepared[key]

    def _kept_tokens(self, shape, device, labels: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
        keep = torch.ones(shape, dtype=torch.bool, device=device)
        for name, t in (("labels", labels), ("mask", mask)):
            if t is None:
                continue
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{_FN}: `{name}` must have the leading shape of the logits {list(shape)}, got "
                                 f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            keep &= (t != self.ignore_index) if name == "labels" else t.to(device=device, dtype=torch.bool)
        return keep.reshape(-1).nonzero().squeeze(1)

    def _scale(self, n_kept: int) -> float:
        if self.reduction == "sum":
            return self.weight
        return self.weight / max(1, n_kept)

    def _check_logits(self, name: str, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
            raise ValueError(f"{_FN}: `{name}` must be a floating tensor [..., V]")
        if x.shape[-1] != self.num_classes:
            raise ValueError(f"{_FN}: `{name}` has {x.shape[-1]} classes but `cost` is "
                             f"[{self.num_classes}, {self.num_classes}]")

    def _check_finite(self, name: str, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{_FN}: `{name}` contains non-finite values (inf or nan) on kept tokens")

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """The loss (a 0-d tensor, float32 for half logits) of student/teacher logits [..., V]; ``labels`` (tokens
        equal to ``ignore_index`` dropped) and ``mask`` (False dropped) have the leading shape of the logits."""
        self._check_logits("student_logits", student_logits)
        self._check_logits("teacher_logits", teacher_logits)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"{_FN}: `teacher_logits` {list(teacher_logits.shape)} and `student_logits` "
                             f"{list(student_logits.shape)} must have the same shape")
        V = self.num_classes
        s = student_logits.reshape(-1, V)
        t = teacher_logits.detach().reshape(-1, V)
        index = self._kept_tokens(student_logits.shape[:-1], s.device, labels, mask)
        dt = torch.float64 if s.dtype == torch.float64 else torch.float32
        if s.device.type == "cpu":  # a synchronisation elsewhere
            self._check_finite("student_logits", s.index_select(0, index))
            self._check_finite("teacher_logits", t.index_select(0, index))
        K = self._kernel(s.device, dt)
        scale = self._scale(index.numel())

        def chunk_fn(s_c, t_c):
            d = _token_distances(s_c.to(dt), t_c.to(dt), K, self.temperature, self.num_iters, self.eps, self.grad,
                                 self.log_domain, self.divergence, self.chunk_elements)
            return d.sum() * scale

        return _ChunkedLoss.apply(chunk_fn, index, self.chunk_size, 2, s, t)

    def forward_hidden(self, student_hidden: Tensor, lm_head_weight: Tensor, teacher_logits: Tensor,
                       labels: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                       lm_head_bias: Optional[Tensor] = None) -> Tensor:
        """The loss with the student's lm_head fused: ``student_hidden`` [..., H], ``lm_head_weight`` [V, H] (and
        ``lm_head_bias`` [V]); the student logits hidden @ weight.T (+ bias) exist one chunk at a time only.
        Gradients flow to the hidden states, the weight and the bias."""
        if not isinstance(student_hidden, Tensor) or student_hidden.dim() < 1:
            raise ValueError(f"{_FN}: `student_hidden` must be a tensor [..., H]")
        if not isinstance(lm_head_weight, Tensor) or lm_head_weight.dim() != 2 or \
                lm_head_weight.shape[0] != self.num_classes or lm_head_weight.shape[1] != student_hidden.shape[-1]:
            raise ValueError(f"{_FN}: `lm_head_weight` must be [V, H] = [{self.num_classes}, "
                             f"{student_hidden.shape[-1]}], got "
                             f"{list(lm_head_weight.shape) if isinstance(lm_head_weight, Tensor) else None}")
        if lm_head_bias is not None and (not isinstance(lm_head_bias, Tensor)
                                         or tuple(lm_head_bias.shape) != (self.num_classes,)):
            raise ValueError(f"{_FN}: `lm_head_bias` must be [V] = [{self.num_classes}]")
        self._check_logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape[:-1]) != tuple(student_hidden.shape[:-1]):
            raise ValueError(f"{_FN}: `teacher_logits` {list(teacher_logits.shape)} and `student_hidden` "
                             f"{list(student_hidden.shape)} must have the same leading shape")
        V, H = self.num_classes, student_hidden.shape[-1]
        h = student_hidden.reshape(-1, H)
        t = teacher_logits.detach().reshape(-1, V)
        index = self._kept_tokens(student_hidden.shape[:-1], h.device, labels, mask)
        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        if h.device.type == "cpu":
            self._check_finite("teacher_logits", t.index_select(0, index))
        K = self._kernel(h.device, dt)
        scale = self._scale(index.numel())
        with_bias = lm_head_bias is not None

        def chunk_fn(h_c, t_c, w, *bias):
            logits = F.linear(h_c, w, bias[0] if with_bias else None)
            if h_c.device.type == "cpu":
                self._check_finite("student logits (hidden @ weight.T)", logits)
            d = _token_distances(logits.to(dt), t_c.to(dt), K, self.temperature, self.num_iters, self.eps,
                                 self.grad, self.log_domain, self.divergence, self.chunk_elements)
            return d.sum() * scale

        extra = (lm_head_bias,) if with_bias else ()
        return _ChunkedLoss.apply(chunk_fn, index, self.chunk_size, 2, h, t, lm_head_weight, *extra)
