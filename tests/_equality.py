"""What "the same model" means in tests that compare two runs of one federation."""

import numpy as np

#: Two runs of the same federation (engines, resume, repeats) do the same arithmetic, but the
#: float32 kernels underneath may not sum in the same order from one call to the next: BLAS
#: and oneDNN choose their blocking (and vector peeling) by thread count and by the memory
#: alignment of the buffers they are handed, which the allocator decides. A fresh clone run
#: single-threaded once differed by one float32 ulp. These bounds are a few ulps of a weight
#: of order 1 after a few rounds; a real divergence (another site order, seed, split or
#: aggregation) moves weights by 1e-3 or more.
RTOL, ATOL = 1e-5, 1e-6


def assert_same_weights(actual, expected, atol=0.0, err_msg=""):
    """Equal up to float32 rounding (or up to ``atol``, where a test allows more)."""
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=max(atol, ATOL), err_msg=err_msg)
