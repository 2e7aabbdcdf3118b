"""Benchmarks: ``python -m fastkd.bench`` (nothing in the library imports this package).

* ``kernels``: every loss against its peers (eager, ``torch.compile``, Liger), forward and backward,
  with peak memory and a CSV (the default);
* ``fused_linear`` (``--fused-linear``): the fused LM head against the unfused path, the bare
  matmuls and Liger's chunked loss, each provider in its own process;
* ``distributed`` (``--distributed P``): the vocabulary-parallel losses over P gloo processes;
* ``memory``: ``PeakRSS``, the resident-memory high-water mark of a block.
"""
