"""The dispatch layer: which backend runs a loss, and the compiled ops' registration.

* ``ops``: loads the compiled extension ``fastkd._C`` (CPU and CUDA kernels of
  ``csrc/``) and registers the fake (meta) implementations and autograd of its ops;
* ``backend``: backend availability (``fastkd.backends()``), the ``"auto"`` choice, and
  ``implementation(name)``, the object whose attributes are a backend's row ops.

The public losses (``fastkd.losses``) call ``resolve`` and then either the reference
(``fastkd.reference``) or a backend's row op; nothing below this layer picks a backend.
"""
