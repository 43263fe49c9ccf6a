"""One codec per format family (see ``lowbit.codecs.base`` for the protocol and the registry).

==============  =================  ==========================================================
family          module             formats
==============  =================  ==========================================================
``int``         ``affine``         ``int1..8``, ``uint1..8``
``float``       ``floatcast``      ``fp16``, ``bf16``
``grid``        ``fixedgrid``      ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1``, ``nf4``, ``log2_*``,
                                   ``binary``, ``ternary``
``codebook``    ``codebook``       ``kmeans_*``, ``quantile_*`` (1-D grids from ``kmeans1d``)
``vector``      ``product``        ``pq``, ``pq_<bits>x<dim>``
==============  =================  ==========================================================

Importing this package registers the five built-in families (in ``lowbit.formats.FAMILIES``
order). A new built-in family is one module here plus its line below; a family defined
elsewhere (a plugin, a test) calls ``register`` once and touches no file of lowbit.

>>> from lowbit.codecs import families
>>> families()
('int', 'float', 'grid', 'codebook', 'vector')
"""

# Not sorted on purpose: importing a family module registers it, in lowbit.formats.FAMILIES order.
from lowbit.codecs.base import EPS, BlockCodec, Codec, QParams, codec_for, families, register  # noqa: I001
from lowbit.codecs import affine, floatcast, fixedgrid, codebook, product  # noqa: F401

__all__ = ["EPS", "BlockCodec", "Codec", "QParams", "codec_for", "families", "register"]
