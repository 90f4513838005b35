"""dmsae: Distilled Matryoshka Sparse Autoencoders as a pipeline of cached stages."""

__version__ = "0.1.0"
