"""edgellama: Llama 3 checkpoints to verified edge bundles (ONNX / Core ML), int8/int4, and a small runtime."""

from edgellama.errors import EdgeLlamaError

__version__ = "0.1.0"

__all__ = ["EdgeLlamaError", "__version__"]
