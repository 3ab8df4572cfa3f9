"""Quantized Linen layers: a ``dot_general`` module, ``QuantDense`` and ``QuantEinsum``.

:class:`QuantDotGeneral` plugs into Flax's own hook, ``nn.Dense(..., dot_general_cls=...)`` (and
``nn.DenseGeneral``), as ``flax.linen.fp8_ops.Fp8DotGeneralOp`` does, and wraps any full-precision
``dot_general``. The arithmetic and the state object are the core's
(:mod:`altgrad_jax.quant_dot`); this module only stores :class:`QuantDotState`'s fields as
variables of the :data:`QUANT_STATE` collection, under the same names as the NNX layers
(``quant_state/<layer>/dot_general/inputs`` ...), never in ``params``: ``apply(...,
mutable=[QUANT_STATE])`` returns the updated histories and optimizers never see them. Histories
are not advanced during ``init`` (as ``nn.BatchNorm`` leaves its running statistics), nor when
the collection is not mutable (inference). Statistics, when the config asks for them, are sown
into :data:`QUANT_STATS` for the inputs and weights; those of the output gradient exist only in
the backward pass and come back from ``quant_value_and_grad`` in the next quant state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from altgrad_jax.config import QuantConfig
from altgrad_jax.quant_dot import (
    ContractionAxes,
    QuantDotState,
    initial_entry,
    quantized_contract,
    state_names,
)

__all__ = ["QUANT_STATE", "QUANT_STATS", "QuantDense", "QuantDotGeneral", "QuantEinsum"]

QUANT_STATE = "quant_state"
QUANT_STATS = "quant_stats"


def contraction(op: Callable[..., jax.Array], *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """``op`` with its static arguments bound; keyword arguments that are None are left out,
    so user ops that do not know ``preferred_element_type`` or ``out_sharding`` still work."""
    given = {k: v for k, v in kwargs.items() if v is not None}
    return functools.partial(op, *args, **given) if args else functools.partial(op, **given)


def dot_general_parts(
    op: Callable[..., jax.Array],
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: lax.DotDimensionNumbers,
    precision: lax.PrecisionLike,
    preferred_element_type: jnp.dtype | None,
    kwargs: dict[str, Any],
) -> tuple[Callable[..., jax.Array], Callable[[], ContractionAxes]]:
    """A ``dot_general`` call as the core takes it: the bound op and its contraction axes
    (computed only when a block format asks for them). Shared by the Linen and NNX ops."""
    contract = contraction(
        op,
        dimension_numbers=dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )
    axes = functools.partial(ContractionAxes.of_dot_general, lhs.ndim, rhs.ndim, dimension_numbers)
    return contract, axes


class QuantDotGeneral(nn.Module):
    """A drop-in ``dot_general`` whose operands and output gradient are quantized.

    The left operand is the ``inputs`` role, the right one the ``weights`` role. State: the
    :class:`~altgrad_jax.quant_dot.QuantDotState` fields as ``quant_state`` variables.

    Attributes:
      config: the :class:`QuantConfig`.
      dot_general: the full-precision op that runs on the quantized operands.
    """

    config: QuantConfig = QuantConfig()
    dot_general: Callable[..., jax.Array] = lax.dot_general

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
            self.dot_general, lhs, rhs, dimension_numbers, precision, preferred_element_type, kwargs
        )
        return self.quantized(contract, lhs, rhs, axes)

    @nn.compact
    def quantized(
        self,
        contract: Callable[[jax.Array, jax.Array], jax.Array],
        lhs: jax.Array,
        rhs: jax.Array,
        axes: ContractionAxes | Callable[[], ContractionAxes] | None = None,
        config: QuantConfig | None = None,
    ) -> jax.Array:
        """``contract(lhs, rhs)`` on quantized operands (any bilinear op, e.g. an einsum);
        block formats need its ``axes`` (see :func:`altgrad_jax.quant_dot.quantized_contract`).

        ``config`` overrides ``self.config`` for this call, with a subset of its roles (an
        embedding lookup drops ``inputs``: its left operand is integer ids); the state is
        ``self.config``'s, shared by name.
        """
        own = self.config
        if not isinstance(own, QuantConfig):
            raise TypeError(f"config must be a QuantConfig, got {own!r}")
        config = own if config is None else config
        variables = {
            name: self.variable(QUANT_STATE, name, initial_entry, own, name)
            for name in state_names(own)
        }
        used = state_names(config)
        key = None
        if config.needs_rng and self.has_rng(config.rng_stream):
            key = self.make_rng(config.rng_stream)
        state = QuantDotState(**{name: variables[name].value for name in used})
        y, new_state, stats = quantized_contract(contract, lhs, rhs, config, state, key, axes)
        if self.is_mutable_collection(QUANT_STATE) and not self.is_initializing():
            for role in ("inputs", "weights", "output_grads"):  # output_grads: "flax"'s scale
                if role in used:
                    variables[role].value = getattr(new_state, role)
        for role, role_stats in stats.items():
            self.sow(QUANT_STATS, role, role_stats)
        return y


def quant_dot_general_cls(
    config: QuantConfig, dot_general: Callable[..., jax.Array] | None = None
) -> Callable[[], QuantDotGeneral]:
    """What to pass as ``dot_general_cls`` of ``nn.Dense`` / ``nn.DenseGeneral``: the child is
    named ``dot_general``, as the NNX layers' attribute, so state paths match."""
    return functools.partial(
        QuantDotGeneral,
        config=config,
        dot_general=dot_general or lax.dot_general,
        name="dot_general",
    )


class QuantDense(nn.Dense):
    """``nn.Dense`` with :class:`QuantDotGeneral`; same ``params`` layout as ``nn.Dense``.

    A given ``dot_general`` is the full-precision op the quantized one wraps.

    Attributes:
      config: the :class:`QuantConfig` (all ``nn.Dense`` attributes apply as well).
    """

    config: QuantConfig = QuantConfig()

    def __post_init__(self) -> None:
        ours = getattr(self.dot_general_cls, "func", None) is QuantDotGeneral
        if self.dot_general_cls is not None and not ours:
            raise ValueError(
                "QuantDense builds its own dot_general_cls from config; pass dot_general= to wrap "
                "a custom op, or use nn.Dense(dot_general_cls=quant_dot_general_cls(config))"
            )
        if not ours:  # clones (Flax re-runs __post_init__) keep the one built the first time
            cls = quant_dot_general_cls(self.config, self.dot_general)
            object.__setattr__(self, "dot_general_cls", cls)
            object.__setattr__(self, "dot_general", None)
        super().__post_init__()


class QuantEinsum(nn.Einsum):
    """``nn.Einsum`` whose input and kernel are quantized; same ``params`` layout.

    The quantized operands go through ``jnp.einsum`` and the output gradient is quantized on the
    einsum's output (elementwise, so the same as on its inner dot_general). State lives under
    ``quant_state/<layer>/einsum_op``, as the NNX layer's ``einsum_op`` attribute.

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
        contract = contraction(
            jnp.einsum,
            einsum_str,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        axes = functools.partial(ContractionAxes.of_einsum, einsum_str, inputs.ndim, kernel.ndim)
        op = QuantDotGeneral(self.config, name="einsum_op")
        y = op.quantized(contract, inputs, kernel, axes)
        if bias is not None:
            y += jnp.reshape(bias, broadcast_shape)
        return y
