"""Quantized NNX layers: ``QuantLinear`` and ``QuantEinsum``, the same arithmetic as Linen's.

They are ``nnx.Linear`` / ``nnx.Einsum`` themselves, with the quantized op plugged into Flax's
own hooks (``dot_general``, ``einsum_op``), so Flax's ``__call__`` runs unchanged: every argument
(``out_sharding``, ``preferred_element_type``, ``promote_dtype``...) behaves as in Flax, and a
user ``dot_general`` / ``einsum_op`` is the full-precision op the quantized one wraps.

The op's state is the core's :class:`~altgrad_jax.quant_dot.QuantDotState`, one variable per
field under the same names as in Linen (``layer.dot_general.inputs``, ``.weights``,
``.output_grads``, ``.output_grads_stats``), so a Linen checkpoint maps onto the NNX model by
path. Histories are :class:`QuantState` variables (the output-gradient ones the subclass
:class:`OutputGradState`), so ``nnx.state(model, QuantState)`` or ``nnx.split(model, nnx.Param,
QuantState, ...)`` separates them from the parameters. Every call advances the forward histories,
as ``nnx.BatchNorm`` in training mode advances its statistics. With ``config.stats`` the last
call's statistics are kept in :class:`QuantStatsVariable` variables and returned by
``quant_stats()`` (those of the output gradient after a ``quant_value_and_grad`` step).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen.modules import contraction, dot_general_parts
from altgrad_jax.quant_dot import (
    ContractionAxes,
    QuantDotState,
    QuantStats,
    initial_entry,
    quantized_contract,
    state_names,
)

__all__ = [
    "OutputGradState",
    "OutputGradStats",
    "QuantDotGeneral",
    "QuantEinsum",
    "QuantEinsumOp",
    "QuantLinear",
    "QuantState",
    "QuantStatsVariable",
]


class QuantState(nnx.Variable):
    """Quantization state of a layer (amax histories, the gradient-statistics probe)."""


class OutputGradState(QuantState):
    """The output-gradient history (delayed and "flax" scaling), updated by
    ``quant_value_and_grad`` (with "flax" the forward call stores the step's scale in it)."""


class OutputGradStats(QuantState):
    """The output gradient's statistics probe, set by ``quant_value_and_grad``."""


class QuantStatsVariable(nnx.Variable):
    """The :class:`QuantStats` of one forward role from the last call."""


_KINDS = {"output_grads": OutputGradState, "output_grads_stats": OutputGradStats}

# Set while quant_value_and_grad differentiates: only it records the output-gradient entries.
IN_QUANT_GRAD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "altgrad_in_quant_value_and_grad", default=False
)


@jax.custom_vjp
def _needs_quant_value_and_grad(y: jax.Array) -> jax.Array:
    """Identity whose backward pass fails outside ``quant_value_and_grad``: a plain
    ``nnx.grad`` would drop the output-gradient history and statistics without a word."""
    return y


def _guard_fwd(y):
    return y, None


def _guard_bwd(_, dy):
    if not IN_QUANT_GRAD.get():
        raise RuntimeError(
            "this model has layers with delayed output-gradient scaling or output-gradient "
            "statistics, which a plain nnx.grad / nnx.value_and_grad silently drops (the "
            "history would stay all zeros); differentiate with "
            "altgrad_jax.nnx.quant_value_and_grad instead"
        )
    return (dy,)


_needs_quant_value_and_grad.defvjp(_guard_fwd, _guard_bwd)


class _QuantOp(nnx.Module):
    """The state and the quantized contraction shared by :class:`QuantDotGeneral` and
    :class:`QuantEinsumOp`."""

    def __init__(self, config: QuantConfig | None, rngs: nnx.Rngs | None) -> None:
        config = QuantConfig() if config is None else config
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {config!r}")
        self.config = config
        for name in state_names(config):
            setattr(self, name, _KINDS.get(name, QuantState)(initial_entry(config, name)))
        self.quant_rngs = nnx.data(None)
        if config.needs_rng:
            try:
                self.quant_rngs = rngs[config.rng_stream].fork()
            except (KeyError, TypeError, AttributeError):
                raise ValueError(
                    f"stochastic rounding needs the RNG stream {config.rng_stream!r}: pass "
                    f"rngs=nnx.Rngs({config.rng_stream}=seed) (or a default stream)"
                ) from None
        self._stats_roles = tuple(
            r for r in ("inputs", "weights") if config.stats and config.role(r)
        )
        for role in self._stats_roles:
            setattr(self, f"{role}_stats", QuantStatsVariable(QuantStats.zeros()))

    def _quantized(
        self,
        contract: Callable[[jax.Array, jax.Array], jax.Array],
        lhs: jax.Array,
        rhs: jax.Array,
        axes: ContractionAxes | Callable[[], ContractionAxes] | None = None,
        config: QuantConfig | None = None,
    ) -> jax.Array:
        """``contract(lhs, rhs)`` quantized; ``config`` (default ``self.config``) may drop
        roles of it for this call (an embedding lookup drops ``inputs``), sharing the state."""
        config = self.config if config is None else config
        names = state_names(config)
        state = QuantDotState(**{name: getattr(self, name).get_value() for name in names})
        key = None if self.quant_rngs is None else self.quant_rngs()
        y, new_state, stats = quantized_contract(contract, lhs, rhs, config, state, key, axes)
        for role in ("inputs", "weights", "output_grads"):  # output_grads: "flax"'s scale
            if role in names:
                getattr(self, role).set_value(getattr(new_state, role))
        for role, role_stats in stats.items():
            getattr(self, f"{role}_stats").set_value(role_stats)
        if "output_grads" in names or "output_grads_stats" in names:
            y = _needs_quant_value_and_grad(y)
        return y

    def quant_stats(self) -> dict[str, QuantStats]:
        """Statistics by role: the forward roles' from the last call, the output gradient's
        from the last ``quant_value_and_grad`` step. Empty unless ``config.stats``."""
        stats = {role: getattr(self, f"{role}_stats").get_value() for role in self._stats_roles}
        if "output_grads_stats" in state_names(self.config):
            stats["output_grads"] = QuantStats.from_probe(self.output_grads_stats.get_value())
        return stats


class QuantDotGeneral(_QuantOp):
    """A ``dot_general`` whose operands (inputs, weights) and output gradient are quantized.

    Args:
      config: the :class:`QuantConfig` (default ``QuantConfig()``).
      dot_general: the full-precision op that runs on the quantized operands.
      rngs: the ``config.rng_stream`` stream for stochastic rounding.
    """

    def __init__(
        self,
        config: QuantConfig | None = None,
        *,
        dot_general: Callable[..., jax.Array] = lax.dot_general,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        super().__init__(config, rngs)
        self.op = dot_general

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        dimension_numbers: lax.DotDimensionNumbers,
        precision: lax.PrecisionLike = None,
        preferred_element_type: jnp.dtype | None = None,
        **kwargs: Any,
    ) -> jax.Array:
        contract, axes = dot_general_parts(
            self.op, lhs, rhs, dimension_numbers, precision, preferred_element_type, kwargs
        )
        return self._quantized(contract, lhs, rhs, axes)


class QuantEinsumOp(_QuantOp):
    """An ``einsum_op`` (``jnp.einsum``'s signature) on quantized operands."""

    def __init__(
        self,
        config: QuantConfig | None = None,
        *,
        einsum_op: Callable[..., jax.Array] = jnp.einsum,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        super().__init__(config, rngs)
        self.op = einsum_op

    def __call__(self, subscripts: str, lhs: jax.Array, rhs: jax.Array, **kwargs: Any) -> jax.Array:
        axes = functools.partial(ContractionAxes.of_einsum, subscripts, lhs.ndim, rhs.ndim)
        return self._quantized(contraction(self.op, subscripts, **kwargs), lhs, rhs, axes)


class QuantLinear(nnx.Linear):
    """``nnx.Linear`` with quantized inputs, kernel and output gradient.

    Args:
      in_features, out_features, **kwargs: as ``nnx.Linear`` (a given ``dot_general`` is the
        full-precision op that runs on the quantized operands).
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
        dot_general: Callable[..., jax.Array] = lax.dot_general,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_features, out_features, dot_general=dot_general, rngs=rngs, **kwargs)
        # After Flax drew the parameters, so they equal nnx.Linear's for the same rngs.
        self.dot_general = nnx.data(QuantDotGeneral(config, dot_general=dot_general, rngs=rngs))

    @property
    def config(self) -> QuantConfig:
        return self.dot_general.config

    def quant_stats(self) -> dict[str, QuantStats]:
        """See :meth:`QuantDotGeneral.quant_stats`."""
        return self.dot_general.quant_stats()


class QuantEinsum(nnx.Einsum):
    """``nnx.Einsum`` with quantized input, kernel and output gradient.

    Args:
      einsum_str, kernel_shape, bias_shape, **kwargs: as ``nnx.Einsum`` (a given ``einsum_op``
        is the full-precision op that runs on the quantized operands).
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
        einsum_op: Callable[..., jax.Array] = jnp.einsum,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            einsum_str, kernel_shape, bias_shape, einsum_op=einsum_op, rngs=rngs, **kwargs
        )
        self.einsum_op = nnx.data(QuantEinsumOp(config, einsum_op=einsum_op, rngs=rngs))

    @property
    def config(self) -> QuantConfig:
        return self.einsum_op.config

    def quant_stats(self) -> dict[str, QuantStats]:
        """See :meth:`QuantDotGeneral.quant_stats`."""
        return self.einsum_op.quant_stats()
