"""flaxcnn: the classic convolutional networks in JAX/Flax, trained data-parallel with optax."""

__version__ = "0.1.0"
