"""The stage layer: one module per stage, each with `run(pipeline)`; stages/registry.py maps each stage's
name to its module and writes down what the pipeline calls on it.

Stages (with pipeline.py, cli.py and the commands above them) are the code that reads the config; the
cores below them (data/, diffusion/, privacy/, semantics/query.py, evaluation/) take plain arguments.
A stage reads an upstream artifact through the reader that sits next to that artifact's writer.
tests/test_layers.py holds the layers to this order.
"""
