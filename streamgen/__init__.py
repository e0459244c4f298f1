"""streamgen: streaming LLM generation over ONNX Runtime."""

__version__ = "0.1.0"
