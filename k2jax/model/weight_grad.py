"""Matmuls against fp32 master weights whose weight gradient comes out in fp32.

Megatron, which trained K2, fuses gradient accumulation into the weight-gradient GEMM: dW is
accumulated in fp32 (`main_grad`) and the data-parallel all-reduce runs in fp32
(`accumulate_allreduce_grads_in_fp32`, which LLM360/k2-train's megatron/arguments.py turns on
for every --bf16 run, as scripts/pretrain_65b.sh is). Plain autodiff of
`dot(x_bf16, w.astype(bf16))` instead rounds dW to bf16 before the cast back to the fp32
parameter, so every gradient reduce-scatter the SPMD partitioner inserts runs in bf16.
`matmul` keeps the forward as it was (the weight cast to the activations' dtype, so the
forward all-gather moves bf16) and returns dW from a dot with an fp32 result, as the fp32
cotangent of the fp32 weight.

Which one a trace gets is set by `weight_gradient_dtype(...)` around the trace (the train step
sets it from `train.gradient_dtype`), like flax's logical axis rules, so the model's modules
need no extra argument.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional

import jax
import jax.numpy as jnp

_STATE = threading.local()


@contextlib.contextmanager
def weight_gradient_dtype(name: str):
    """Within the block, `matmul` gives weight gradients in `name` ("float32" or "bfloat16")."""
    previous = getattr(_STATE, "dtype", "bfloat16")
    _STATE.dtype = name
    try:
        yield
    finally:
        _STATE.dtype = previous


def _fp32_weight_gradients() -> bool:
    # Outside any block (inference, eval, conversion) gradients are not taken: autodiff's.
    return getattr(_STATE, "dtype", "bfloat16") == "float32"


def matmul(x_RxI: jnp.ndarray, w_IxO: jnp.ndarray,
           preferred_element_type: Optional[jnp.dtype] = None) -> jnp.ndarray:
    """x [R, I] (compute dtype) @ w [I, O] cast to x's dtype -> [R, O] in x's dtype (or in
    `preferred_element_type`). With fp32 weight gradients on and a wider weight than x, dW is
    float32 [I, O] from a dot accumulating in fp32; dx is exactly autodiff's."""
    if _fp32_weight_gradients() and jnp.dtype(w_IxO.dtype).itemsize > jnp.dtype(
            x_RxI.dtype).itemsize:
        return _matmul_fp32_wgrad(x_RxI, w_IxO, preferred_element_type)
    return _forward(x_RxI, w_IxO, preferred_element_type)


def _forward(x_RxI, w_IxO, preferred_element_type):
    return jnp.dot(x_RxI, w_IxO.astype(x_RxI.dtype), preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_fp32_wgrad(x_RxI, w_IxO, preferred_element_type):
    return _forward(x_RxI, w_IxO, preferred_element_type)


def _fwd(x_RxI, w_IxO, preferred_element_type):
    # The fp32 weight is the residual (it is live anyway); its bf16 copy is recast in backward.
    return _forward(x_RxI, w_IxO, preferred_element_type), (x_RxI, w_IxO)


def _bwd(preferred_element_type, residuals, dy_RxO):
    x_RxI, w_IxO = residuals
    w_c = w_IxO.astype(x_RxI.dtype)
    _, x_vjp = jax.vjp(lambda x: jnp.dot(x, w_c, preferred_element_type=preferred_element_type),
                       x_RxI)
    (dx_RxI,) = x_vjp(dy_RxO)
    # dW = x^T dy over all rows, accumulated and returned in fp32 (dy may be fp32: the logits').
    dw_IxO = jax.lax.dot_general(x_RxI, dy_RxO, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return dx_RxI, dw_IxO.astype(w_IxO.dtype)


_matmul_fp32_wgrad.defvjp(_fwd, _bwd)


def scale(x_BxSxE: jnp.ndarray, scale_E: jnp.ndarray) -> jnp.ndarray:
    """scale_E cast to x's dtype, times x (the RMSNorm gain). With fp32 weight gradients on,
    d(scale) = sum over rows of dy * x is reduced in fp32 (autodiff reduces the bf16 product
    in bf16, then casts)."""
    if _fp32_weight_gradients() and jnp.dtype(scale_E.dtype).itemsize > jnp.dtype(
            x_BxSxE.dtype).itemsize:
        return _scale_fp32_grad(x_BxSxE, scale_E)
    return scale_E.astype(x_BxSxE.dtype) * x_BxSxE


@jax.custom_vjp
def _scale_fp32_grad(x_BxSxE, scale_E):
    return scale_E.astype(x_BxSxE.dtype) * x_BxSxE


def _scale_fwd(x_BxSxE, scale_E):
    return _scale_fp32_grad(x_BxSxE, scale_E), (x_BxSxE, scale_E)


def _scale_bwd(residuals, dy_BxSxE):
    x_BxSxE, scale_E = residuals
    dx = (dy_BxSxE * scale_E.astype(x_BxSxE.dtype)).astype(x_BxSxE.dtype)
    product = dy_BxSxE.astype(jnp.float32) * x_BxSxE.astype(jnp.float32)
    dscale_E = jnp.sum(product.reshape(-1, product.shape[-1]), axis=0)
    return dx, dscale_E.astype(scale_E.dtype)


_scale_fp32_grad.defvjp(_scale_fwd, _scale_bwd)
