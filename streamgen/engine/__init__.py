"""The generation engine. Imports onnxruntime, tokenizers, numpy and jinja2 only."""
