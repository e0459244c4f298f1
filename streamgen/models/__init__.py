"""Model pipeline: pull, convert, export, quantize and the cache layout.

Only `cache` is used by the serving path; the rest needs the export extra.
"""
