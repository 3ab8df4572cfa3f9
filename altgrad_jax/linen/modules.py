"""Quantized Linen layers: a ``dot_general`` module, ``QuantDense`` and ``QuantEinsum``.

:class:`QuantDotGeneral` plugs into Flax's own hook, ``nn.Dense(..., dot_general_cls=...)`` (and
``nn.DenseGeneral``), as ``flax.linen.fp8_ops.Fp8DotGeneralOp`` does. Unlike fp8_ops, its amax
histories live in their own collection, :data:`QUANT_STATE`, not in ``params``: ``apply(...,
mutable=[QUANT_STATE])`` returns the updated histories and optimizers never see them. The
histories are not advanced during ``init`` (as ``nn.BatchNorm`` leaves its running statistics),
nor when the collection is not mutable (inference). Statistics, when the config asks for them,
are sown into :data:`QUANT_STATS` for the inputs and weights; those of the output gradient exist
only in the backward pass and come back from ``quant_value_and_grad`` in the next quant state,
as ``quant_state/<path>/output_grads_stats``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from altgrad_jax.config import QuantConfig
from altgrad_jax.quant_dot import (
    OUTPUT_GRAD_STATE,
    OUTPUT_GRAD_STATS,
    create_history,
    empty_stats,
    grad_stats_enabled,
    quantized_contract,
    state_roles,
)

__all__ = ["QUANT_STATE", "QUANT_STATS", "QuantDense", "QuantDotGeneral", "QuantEinsum"]

QUANT_STATE = "quant_state"
QUANT_STATS = "quant_stats"


class QuantDotGeneral(nn.Module):
    """A drop-in ``dot_general`` whose operands and output gradient are quantized.

    The left operand is the ``inputs`` role, the right one the ``weights`` role. State:
    ``quant_state/<path>/{inputs,weights,output_grads}`` :class:`AmaxHistory` (the last only for
    delayed output-gradient scaling); see :mod:`altgrad_jax.quant_dot` for the arithmetic.

    Attributes:
      config: the :class:`QuantConfig`.
    """

    config: QuantConfig = QuantConfig()

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: lax.DotDimensionNumbers,
        precision: lax.PrecisionLike = None,
        preferred_element_type: jnp.dtype | None = None,
    ) -> jax.Array:
        contract = functools.partial(
            lax.dot_general,
            dimension_numbers=dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
        return self.quantized(contract, lhs, rhs)

    @nn.compact
    def quantized(
        self, contract: Callable[[jax.Array, jax.Array], jax.Array], lhs: jax.Array, rhs: jax.Array
    ) -> jax.Array:
        """``contract(lhs, rhs)`` on quantized operands (any bilinear op, e.g. an einsum)."""
        config = self.config
        variables = {
            role: self.variable(QUANT_STATE, role, create_history, config.role(role))
            for role in state_roles(config)
        }
        key = None
        if config.needs_rng and self.has_rng(config.rng_stream):
            key = self.make_rng(config.rng_stream)
        histories = {role: var.value for role, var in variables.items()}
        probe = None
        if grad_stats_enabled(config):
            probe = self.variable(QUANT_STATE, OUTPUT_GRAD_STATS, empty_stats).value
        y, new_histories, stats = quantized_contract(
            contract, lhs, rhs, config, histories, key, probe
        )
        if self.is_mutable_collection(QUANT_STATE) and not self.is_initializing():
            for role, var in variables.items():
                if role != OUTPUT_GRAD_STATE:
                    var.value = new_histories[role]
        for role, role_stats in stats.items():
            self.sow(QUANT_STATS, role, role_stats)
        return y


class QuantDense(nn.Dense):
    """``nn.Dense`` with :class:`QuantDotGeneral`; same ``params`` layout as ``nn.Dense``.

    An explicitly given ``dot_general`` or ``dot_general_cls`` takes precedence over ``config``.

    Attributes:
      config: the :class:`QuantConfig` (all ``nn.Dense`` attributes apply as well).
    """

    config: QuantConfig = QuantConfig()

    def __post_init__(self) -> None:
        if self.dot_general is None and self.dot_general_cls is None:
            object.__setattr__(
                self, "dot_general_cls", functools.partial(QuantDotGeneral, config=self.config)
            )
        super().__post_init__()


class QuantEinsum(nn.Einsum):
    """``nn.Einsum`` whose input and kernel are quantized; same ``params`` layout.

    The quantized operands go through ``jnp.einsum`` and the output gradient is quantized on the
    einsum's output (elementwise, so the same as on its inner dot_general).

    Attributes:
      config: the :class:`QuantConfig` (all ``nn.Einsum`` attributes apply as well).
    """

    config: QuantConfig = QuantConfig()

    @nn.compact
    def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
        einsum_str = nn.merge_param("einsum_str", self.einsum_str, einsum_str).replace(" ", "")
        if "->" not in einsum_str or einsum_str.count(",") != 1:
            raise ValueError(
                f"einsum_str must be explicit ('->') with exactly two operands, got {einsum_str!r}"
            )
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias_shape, broadcast_shape = self._get_bias_shape(einsum_str, inputs, kernel)
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        contract = functools.partial(
            jnp.einsum,
            einsum_str,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        y = QuantDotGeneral(self.config).quantized(contract, inputs, kernel)
        if bias is not None:
            y += jnp.reshape(bias, broadcast_shape)
        return y
