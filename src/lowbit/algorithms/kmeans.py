"""Moved to ``lowbit.codecs.kmeans1d`` (the codebook codec's learner, a leaf below the primitives).

Kept so that ``lowbit.algorithms.kmeans`` still works: every name read or set here is that
module's (patching ``DP_BUDGET`` here patches the learner).
"""

from lowbit._alias import alias
from lowbit.codecs import kmeans1d

alias(__name__, kmeans1d)
