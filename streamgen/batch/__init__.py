"""Offline batch inference: a file of OpenAI Batch API requests through the engine, no server.

- files.py   the input read as a bounded stream, the output written one whole line at a time and
             scanned on a rerun (resume), the compact set of custom_ids seen
- lines.py   one input line -> a request (validated by the HTTP API's own code) or its answer;
             the output lines in the OpenAI Batch shape
- runner.py  the loop: a read-ahead window ordered for the prefix cache, every slot kept busy,
             each answer written as it finishes
- progress.py  a bar on a terminal, periodic lines elsewhere, and the summary

docs/batch.md describes the command; `streamgen batch` in cli.py wires it.
"""
