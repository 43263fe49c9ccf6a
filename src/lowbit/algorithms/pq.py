"""Moved to ``lowbit.codecs.product`` (the product-quantization codec and its k-means).

Kept so that ``lowbit.algorithms.pq`` still works: every name read or set here is that module's.
"""

from lowbit._alias import alias
from lowbit.codecs import product

alias(__name__, product)
