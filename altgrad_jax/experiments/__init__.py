"""Experiments: the format-comparison sweep, its data, model and reports.

``python -m altgrad_jax sweep`` trains a small character transformer under each chosen format and
update rule and reports which format loses its updates to bit-stall and which rule rescues it.
"""
