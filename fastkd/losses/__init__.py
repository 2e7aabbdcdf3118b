"""The public losses, by family. Each checks its arguments once, picks a backend
(``fastkd.dispatch``) and runs its row op or its reference; with ``process_group`` it
hands over to ``fastkd.distributed``.

* ``classification``: ``kd_loss``, ``dkd_loss``, ``ats_loss``, ``dist_loss``, ``mgd_loss``;
* ``divergence``: ``reverse_kl_loss``, ``jsd_loss``, ``skew_kl_loss``, ``tvd_loss`` and
  ``kd_loss`` against a ``TopKTeacher``;
* ``fused_linear``: ``fused_linear_kd_loss``, the LM head fused with any of them.

Users import them from ``fastkd`` or ``fastkd.functional``.
"""
