"""lmport: local LLM inference for Elixir, Node, Go and Python.

One import namespace for the three packages, so that none of them shadows another distribution's top-level module
(Hugging Face's `kernels`, which transformers imports, among them):
- `lmport.engine`: the inference engine (`from lmport.engine import LLM, SamplingParams`);
- `lmport.kernels`: the compute kernels (Triton on CUDA, C++ on CPU, the PyTorch reference);
- `lmport.bridge`: the wire protocol, stdio worker, Python shim, HTTP server, manifest, client generator and CLI.
"""
