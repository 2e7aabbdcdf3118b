"""Distillation losses over ``torch.distributed`` process groups (issue 12).

Two kinds of parallelism, one keyword (``process_group``):

* **Vocabulary parallel** (Megatron layout, tensor parallelism): every rank holds
  *all* rows, and the last dim of its logits is its contiguous vocabulary shard
  ``[r * V_local, (r + 1) * V_local)`` in rank order (equal shards: ``V = P *
  V_local``; Megatron pads the vocabulary to a multiple of P). ``target`` and
  top-k ids are global token ids, identical on every rank, as are
  ``sample_weight`` and the ``TopKTeacher`` log-probs. The loss equals the
  single-process loss over the concatenated vocabulary, on every rank, and each
  rank's gradient is the matching slice of the single-process gradient.
  Functions: ``kd_loss``, ``reverse_kl_loss``, ``jsd_loss``, ``skew_kl_loss``,
  ``tvd_loss``, ``jeffreys_loss``, ``triangular_loss`` (all with ``ce_weight``, ``return_parts`` and a
  ``TopKTeacher``),
  ``akl_loss`` (dense teachers; its head by radix sweeps of all-reduced mass histograms: ``akl``),
  ``dkd_loss``, ``ats_loss`` (with ``ce_weight`` and ``return_parts``).
* **Data parallel** (``dist_loss``): rows are sharded (any count per rank, 0
  included), classes are not; the intra-class Pearson term is taken over the
  global batch (see ``dist_loss``).

How the vocabulary-parallel losses work. A row's loss needs whole-row
quantities (the log-sum-exps), so each rank computes them from its shard with
three all-reduces of per-row numbers, never of logits:

1. MAX of the raw per-row maxima (student, teacher, and the set a log-sum-exp is
   taken over: the non-target classes of DKD, the non-top-k ids of a tail bucket);
2. SUM of the sums of exponentials at those global shifts, of the logits at global
   ids (the target, the top-k ids: only the owning rank adds a non-zero), and of
   the cross-entropy's sum at T = 1;
3. SUM of the per-row partial divergences and of the partial sums of their
   derivatives (``sum G``, ``sum H`` of ``docs/design.md``), which the softmax
   chain rule needs (``dL/ds_c = (G_c - q_c sum G) / T``).

Elementwise derivatives ``G``, ``H`` come from autograd of the reference's own
row math (``fastkd.reference.divergence.soft_rows``) on the local shard, so the
special cases (zero-probability terms, ``log m`` in log space, ``beta`` 0 and 1)
are the reference's exactly; the forward KL (KD, ATS, JSD with beta = 0) uses
its closed form ``G = -p``, ``H = p (log p - log q)`` instead (no autograd pass).
A top-k teacher needs no third round: the bucket log-probs are all-reduced
(``K`` numbers per row), and every rank evaluates the bucket math identically. The gradients are formed in the forward pass and
stored in the input dtype (one ``[N, V_local]`` buffer per input that requires
grad); backward only scales them, in place (``docs/design.md``, "Autograd and
gradient memory"): a stored gradient is used once (``retain_graph`` raises).

Communication per call, in bytes (``comm_stats``; ``e`` = 4 for float32 math, 8
for float64): ``e * N * (r1 + r2 + r3 + K) + 32`` with ``r1 + r2 + r3`` the
number of per-row numbers (listed in ``PER_ROW_FLOATS``) and ``K``
the top-k width (0 for dense teachers); the 32 bytes are the shape check (four
int64: rows with the input dtypes and gradient flags, and shard width, ``_check_group_shapes``). It does not depend on
``V``. Calls: 1, then 2 or 3 per row chunk (below), at most 49 (4 on the shard kernels,
whatever the logits' dtype: float32, bf16 or fp16). AKL: 3 + 4 per row chunk (float64 math: 3 + 8; the
head's histogram rounds, 256 numbers per row each), at most 113 (float64: 177).

Memory: the local math runs on row chunks (at most ``CHUNK_MAX`` = 16 chunks of at
least ``CHUNK_MIN_ROWS`` = 64 rows; the split depends on ``N`` and the dtypes only, so
every rank issues the same collectives: the shape check makes ranks agree on both), each chunk's
float32 temporaries (about 12 x ``[rows, V_local]`` for a dense teacher with both
gradients) freed before the next. The shard kernels make no ``[rows, V_local]`` temporaries:
they read float32, bf16 or fp16 logits as they are (converted after loading, math in float32)
and write into the gradient buffers in the input dtype (bf16/fp16: G and H recomputed by the
grad pass rather than kept in bf16), so they take all rows in one chunk: three collectives per
call, not three per chunk.
What outlives the call: the stored gradients, in the input dtype. Measured peak (RSS high-water
mark) over the inputs, ``[1024, 32000]`` float32 in a group of one process: 2.08 x ``[N, V]``
for KD with both gradients (the two gradients), 1.00 x with the student's only, 2.0 x for a
top-32 teacher (PyTorch math: one gradient and the chunk temporaries). bf16 and fp16 logits (shard
kernels, a fresh process per call): 1.00 x ``[N, V]`` in their dtype for KD and JSD with the
student's gradient, 2.00 x with both (the gradients alone; when they were copied to float32 per row
chunk: 1.0-2.0 x and 2.6-2.9 x).
Math in float32 (float64 for float64 inputs), whatever the input dtype.

Values are checked where reading them is free (CPU tensors; ``fastkd.set_value_checks``):
target and top-k ids in ``[0, V)`` (``V`` the global vocabulary), equal shard widths.

Where things are: ``comm`` (the all-reduce helper, its counts, the group checks), ``rows`` (what
every sharded loss shares: checks, row weights, row chunks, the stored-gradient node),
``divergence`` (the divergences), ``akl`` (AKL's head and rows), ``shard_kernels`` (their fused shard passes),
``classification`` (DKD, ATS, DIST), ``fused_linear`` (the sharded head's row op) and
``settings`` (``SHARD_KERNELS``, ``CHUNK_MIN_ROWS``, ``CHUNK_MAX``: set them here, as
``fastkd.distributed.SHARD_KERNELS = "off"``).
"""
import sys
import types

from . import settings
from .classification import ats_loss, dist_loss, dkd_loss
from .comm import PER_ROW_FLOATS, CommStats, comm_stats, count_comm, reset_comm_stats  # noqa: F401
from .divergence import ab_divergence_loss, akl_loss, alpha_divergence_loss, renyi_loss
from .divergence import (entropy_gated_kl_loss, forward_kl_loss, jeffreys_loss, jsd_loss, kd_loss, reverse_kl_loss,
                         skew_kl_loss, triangular_loss, tvd_loss)
from .fused_linear import fused_linear_row_op  # noqa: F401  (the sharded fused head's row op)
from .settings import CHUNK_MAX, CHUNK_MIN_ROWS, SHARD_KERNELS  # noqa: F401  (the knobs)
from .shard_kernels import shard_kernels  # noqa: F401

__all__ = [
    "kd_loss", "forward_kl_loss", "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "jeffreys_loss",
    "alpha_divergence_loss", "ab_divergence_loss", "renyi_loss", "akl_loss",
    "triangular_loss", "entropy_gated_kl_loss", "dkd_loss", "ats_loss", "dist_loss", "comm_stats", "reset_comm_stats", "count_comm", "PER_ROW_FLOATS",
]


class _Package(types.ModuleType):
    """Setting a knob on the package (``fastkd.distributed.SHARD_KERNELS = "off"``, as before the
    package split) sets it in ``settings``, where the losses read it at each call."""

    def __setattr__(self, name, value):
        if name in settings.NAMES:
            setattr(settings, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
