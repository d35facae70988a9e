"""JAX settings that make the tests and the doctests under `ueaj/` strict.

Pytest loads this file before it collects `tests/` and `ueaj/`, so the
settings hold for the whole session when it runs from the repository root.
"""

import jax

# Adding arrays of different rank, such as (4,) + (2, 4), raises instead of
# broadcasting, so a dropped or extra axis fails where it happens.
jax.config.update("jax_numpy_rank_promotion", "raise")

# NOTE: Three stricter settings stay off.
# - jax_numpy_dtype_promotion="strict": optax 0.2.8 raises under it, because
#   Adam's bias correction raises a float to an int32 power.
# - jax_debug_nans: it also raises on NaNs that are computed and then
#   discarded. optax.clip_by_global_norm divides by a zero norm before it
#   selects the unclipped gradient, so all-zero gradients raise.
# - jax_check_tracer_leaks: it disables some of JAX's caches, and the first
#   test of tests/test_optimizer.py ran for over 6 minutes with it instead
#   of about 40 s. test_optimizer_created_in_jit checks for leaks around
#   its nnx.jit call with the jax.checking_leaks() context manager instead.
