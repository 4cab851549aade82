"""The stage layer: one module per stage, each with `run(pipeline)`.

Stages (with pipeline.py, cli.py and the commands above them) are the code that reads the config; the
cores below them (data/, diffusion/, privacy/, semantics/query.py, evaluation/) take plain arguments.
A stage reads an upstream artifact through the reader that sits next to that artifact's writer.
"""
