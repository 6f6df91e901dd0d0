"""rlhf: the core library of the RLHF platform (models, data, algorithms, evaluation).

Algorithms live in :mod:`rlhf.algos`, one module per seed equation; nothing here speaks gRPC.
"""

__version__ = "0.1.0"
