"""Moved to ``lowbit.codecs.kmeans1d`` (the codebook codec's learner, a leaf below the primitives).

This name is an alias of that module (the same module object, so patching its constants here
patches them there) for code that imports ``lowbit.algorithms.kmeans``.
"""

import sys

from lowbit.codecs import kmeans1d

sys.modules[__name__] = kmeans1d
