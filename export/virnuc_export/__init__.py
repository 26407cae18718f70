"""ESM-2 checkpoint → packed ONNX graph (the virnuc-trt exporter).

The graph is written node by node with the `onnx` helper API from the weights (no tracing), for packed
inputs: all sequences of a batch concatenated without padding, described by `cu_seqlens`.
See `export/README.md` for the graph and metadata contract.
"""

__version__ = "0.1.0"
