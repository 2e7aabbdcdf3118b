"""fastkd inside the trainers people run (issue 20): import the submodule you need.

* ``fastkd.integrations.transformers``: ``distillation_loss(model, teacher_model, inputs, loss_fn,
  num_items_in_batch)`` for any trainer's ``compute_loss``, and ``DistillationTrainer``, a
  ``transformers.Trainer`` that distils from a teacher model or from top-k teacher data.
* ``fastkd.integrations.trl``: ``DistillationTrainer`` (on-policy, ``trl.DistillationTrainer``) and
  ``GKDTrainer`` (``trl.experimental.gkd.GKDTrainer``) with fastkd's fused head as their loss.

This package sits above ``fastkd`` (``docs/design.md``, "Integrations"): nothing in the library imports
it, and importing it imports nothing heavy; each submodule imports its trainer library.
"""
