"""flaxcnn: the classic convolutional networks in JAX/Flax, trained data-parallel with optax."""

from flaxcnn import xla_flags as _xla_flags

_xla_flags.apply()  # before JAX opens a backend: see flaxcnn/xla_flags.py

__version__ = "0.1.0"
