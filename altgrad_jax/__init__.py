"""altgrad_jax: simulated low-bit floating-point training in JAX, and why formats fail.

Layers (each imports only from those above it): ``formats`` -> ``bits`` -> ``quantize`` ->
``scaling`` -> ``rules`` -> ``stall``. The core imports neither Flax nor optax; the Flax layers
live in :mod:`altgrad_jax.linen` / :mod:`altgrad_jax.nnx`, the optax transforms in
:mod:`altgrad_jax.optim`.
"""

from altgrad_jax.bits import ROUNDING_MODES, from_bits, round_float32, to_bits, ulp
from altgrad_jax.formats import (
    BF16,
    E0M7,
    E1M6,
    E2M1,
    E2M3,
    E2M5,
    E3M2,
    E3M4,
    E4M3,
    E5M2,
    E6M1,
    E7M0,
    E8M0,
    EIGHT_BIT_FORMATS,
    FP16,
    FloatFormat,
    FormatLike,
    FormatParams,
    as_params,
    format_params,
    format_table,
    get_format,
    grid,
    list_formats,
    register_format,
    stack_format_params,
)
from altgrad_jax.quantize import quantize, random_bits
from altgrad_jax.rules import FormatSpec, PathRules, leaf_format, path_str
from altgrad_jax.scaling import AmaxHistory, compute_scale, scale_and_update
from altgrad_jax.stall import (
    BitStallDetector,
    ExactCount,
    StallStats,
    detect_bit_stall,
    tree_bit_stall,
)

__version__ = "0.1.0"

__all__ = [
    "BF16",
    "E0M7",
    "E1M6",
    "E2M1",
    "E2M3",
    "E2M5",
    "E3M2",
    "E3M4",
    "E4M3",
    "E5M2",
    "E6M1",
    "E7M0",
    "E8M0",
    "EIGHT_BIT_FORMATS",
    "FP16",
    "ROUNDING_MODES",
    "AmaxHistory",
    "BitStallDetector",
    "ExactCount",
    "FloatFormat",
    "FormatLike",
    "FormatParams",
    "FormatSpec",
    "PathRules",
    "StallStats",
    "as_params",
    "compute_scale",
    "detect_bit_stall",
    "format_params",
    "format_table",
    "from_bits",
    "get_format",
    "grid",
    "leaf_format",
    "list_formats",
    "path_str",
    "quantize",
    "random_bits",
    "register_format",
    "round_float32",
    "scale_and_update",
    "stack_format_params",
    "to_bits",
    "tree_bit_stall",
    "ulp",
]
