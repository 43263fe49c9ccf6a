"""Moved to ``lowbit.codecs.product`` (the product-quantization codec and its k-means).

This name is an alias of that module (the same module object) for code that imports
``lowbit.algorithms.pq``.
"""

import sys

from lowbit.codecs import product

sys.modules[__name__] = product
