"""Quantized NNX layers: ``QuantLinear`` and ``QuantEinsum``, same arithmetic as the Linen ones.

Amax histories are :class:`QuantState` variables (the output-gradient history the subclass
:class:`OutputGradState`), so ``nnx.state(model, QuantState)`` or ``nnx.split(model, nnx.Param,
QuantState, ...)`` separates them from the parameters, and ``nnx.jit`` or plain ``jax.jit`` over
split state carry them. Every call advances the forward histories, as ``nnx.BatchNorm`` in
training mode advances its statistics. With ``config.stats`` the last call's statistics are kept
in :class:`QuantStatsVariable` variables and returned by :meth:`QuantLayer.quant_stats` (those of
the output gradient, :class:`OutputGradStats`, after a ``quant_value_and_grad`` step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from altgrad_jax.config import ROLES, QuantConfig
from altgrad_jax.quant_dot import (
    OUTPUT_GRAD_STATE,
    QuantStats,
    create_history,
    empty_stats,
    grad_stats_enabled,
    quantized_contract,
    state_roles,
)

__all__ = [
    "OutputGradState",
    "OutputGradStats",
    "QuantEinsum",
    "QuantLayer",
    "QuantLinear",
    "QuantState",
    "QuantStatsVariable",
]


class QuantState(nnx.Variable):
    """An :class:`AmaxHistory` of a quantized tensor role (not a parameter)."""


class OutputGradState(QuantState):
    """The output-gradient history (delayed scaling), updated by ``quant_value_and_grad``."""


class QuantStatsVariable(nnx.Variable):
    """The :class:`QuantStats` of one tensor role from the last call."""


class OutputGradStats(QuantStatsVariable):
    """The output gradient's :class:`QuantStats`, set by ``quant_value_and_grad``."""


class QuantLayer(nnx.Module):
    """Quantization state and the quantized contraction, shared by the NNX layers."""

    def _init_quant(self, config: QuantConfig, rngs: nnx.Rngs | None) -> None:
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {config!r}")
        self.config = config
        for role in state_roles(config):
            kind = OutputGradState if role == OUTPUT_GRAD_STATE else QuantState
            setattr(self, f"{role}_amax", kind(create_history(config.role(role))))
        self.quant_rngs = nnx.data(None)
        if config.needs_rng:
            try:
                self.quant_rngs = rngs[config.rng_stream].fork()
            except (KeyError, TypeError):
                raise ValueError(
                    f"stochastic rounding needs the RNG stream {config.rng_stream!r}: pass "
                    f"rngs=nnx.Rngs({config.rng_stream}=seed) (or a default stream)"
                ) from None
        self._stats_roles = tuple(r for r in ROLES[:2] if config.stats and config.role(r))
        for role in self._stats_roles:
            setattr(self, f"{role}_stats", QuantStatsVariable(empty_stats()))
        if grad_stats_enabled(config):
            self._stats_roles += ("output_grads",)
            self.output_grads_stats = OutputGradStats(empty_stats())

    def _quantized(
        self, contract: Callable[[jax.Array, jax.Array], jax.Array], lhs: jax.Array, rhs: jax.Array
    ) -> jax.Array:
        roles = state_roles(self.config)
        histories = {role: getattr(self, f"{role}_amax").get_value() for role in roles}
        key = None if self.quant_rngs is None else self.quant_rngs()
        probe = self.output_grads_stats.get_value() if grad_stats_enabled(self.config) else None
        y, new_histories, stats = quantized_contract(
            contract, lhs, rhs, self.config, histories, key, probe
        )
        for role in roles:
            if role != OUTPUT_GRAD_STATE:
                getattr(self, f"{role}_amax").set_value(new_histories[role])
        for role, role_stats in stats.items():
            getattr(self, f"{role}_stats").set_value(role_stats)
        return y

    def quant_stats(self) -> dict[str, QuantStats]:
        """Statistics by role: the last call's, and the output gradient's from the last helper step.

        Empty unless ``config.stats``.
        """
        return {role: getattr(self, f"{role}_stats").get_value() for role in self._stats_roles}


class QuantLinear(nnx.Linear, QuantLayer):
    """``nnx.Linear`` with quantized inputs, kernel and output gradient.

    Args:
      in_features, out_features, **kwargs: as ``nnx.Linear``.
      config: the :class:`QuantConfig` (default ``QuantConfig()``).
      rngs: parameter initialization, and the ``config.rng_stream`` stream for stochastic
        rounding.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        config: QuantConfig | None = None,
        rngs: nnx.Rngs,
        **kwargs,
    ):
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self._init_quant(QuantConfig() if config is None else config, rngs)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], bias), dtype=self.dtype
        )
        contract = functools.partial(
            lax.dot_general,
            dimension_numbers=(((inputs.ndim - 1,), (0,)), ((), ())),
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        y = self._quantized(contract, inputs, kernel)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class QuantEinsum(nnx.Einsum, QuantLayer):
    """``nnx.Einsum`` with quantized input, kernel and output gradient.

    Args:
      einsum_str, kernel_shape, bias_shape, **kwargs: as ``nnx.Einsum``.
      config: the :class:`QuantConfig` (default ``QuantConfig()``).
      rngs: parameter initialization, and the stochastic-rounding stream.
    """

    def __init__(
        self,
        einsum_str: str,
        kernel_shape: tuple[int, ...],
        bias_shape: tuple[int, ...] | None = None,
        *,
        config: QuantConfig | None = None,
        rngs: nnx.Rngs,
        **kwargs,
    ):
        super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **kwargs)
        self._init_quant(QuantConfig() if config is None else config, rngs)

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
        einsum_str = (einsum_str if einsum_str is not None else self.einsum_str).replace(" ", "")
        self._einsum_str_check(einsum_str)
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype(
            (inputs, self.kernel[...], bias), dtype=self.dtype
        )
        contract = functools.partial(
            self.einsum_op,
            einsum_str,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        y = self._quantized(contract, inputs, kernel)
        if bias is not None:
            y += jnp.reshape(bias, self._infer_broadcasted_bias_shape(einsum_str, inputs, kernel))
        return y
