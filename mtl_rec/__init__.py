"""mtl_rec: one multi-task network on shared embeddings, versus ensemble fusion, in JAX."""

__version__ = '0.1.0'
