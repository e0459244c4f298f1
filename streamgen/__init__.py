"""streamgen: streaming LLM generation over ONNX Runtime."""

__version__ = "0.1.0"
# The distribution's name (pyproject.toml's [project] name), what importlib.metadata knows this package by.
# Not "streamgen": that name on PyPI is an unrelated project.
DISTRIBUTION = "streamgen-onnx"
