"""What every layer of fastkd stands on: no kernels, no backends, nothing but torch.

* ``checks``: argument checks (each raises ``TypeError`` / ``ValueError`` naming the argument)
  and the value-check switch (``fastkd.set_value_checks``);
* ``rows``: logits as rows ``[N, C]``, row weights (``ignore_index``, ``sample_weight``,
  reduction), the rows a loss reads;
* ``topk``: ``TopKTeacher``, the top-k teacher data;
* ``divergence``: the divergence family's row-op contract (coefficients, op codes,
  ``LossParts``) and its argument check;
* ``autograd``: the stored-gradient autograd every fused op registers;
* ``mask``: MGD's counter-based mask hash, identical on every backend.
"""
