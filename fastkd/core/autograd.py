"""Autograd for the fused loss ops, shared by the compiled (cpu, cuda) and Triton backends.

Every fused op computes its input gradients in the forward pass (already
multiplied by the row weights), so backward only scales them by the incoming
gradient, in place: the stored gradient is owned by the op (it was allocated by
the forward and is referenced by nothing but the autograd context), so the
scaled gradient reuses its memory instead of allocating a second ``[N, C]``
tensor. That makes the stored gradient usable once: a second backward through
the same graph (``retain_graph=True``) raises instead of scaling it twice, and
double backward (``create_graph=True``) raises because only the first
derivative is stored.

No host synchronisation on CUDA tensors: the incoming gradient is never read on
the host there (so CUDA-graph capture works and the launch queue never
stalls). On CPU tensors reading it is free, and a 0-d incoming gradient of
exactly 1 skips the scaling pass.
"""
import torch

from . import checks


def _traced(x: torch.Tensor) -> bool:
    # fake / functional tensor subclasses while torch.compile or opcheck traces
    return type(x) is not torch.Tensor or torch.compiler.is_compiling()


def scale_stored_grad(stored: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """d(final)/d(input) from the stored d(loss)/d(input) and the loss's incoming gradient.

    ``grad_loss`` is 0-d (reduced loss) or holds one value per row, scaling the
    matching row (dim 0) of ``stored``. Scales ``stored`` in place (eager) and
    returns it. The product is computed in float32 and stored in the gradient's
    dtype, so a loss weight such as 0.9 is not first rounded to bfloat16 (a 0.2%
    bias on every gradient): the scale is given the shape ``[-1, 1, ...]``, so
    it takes part in type promotion (a 0-d tensor would be cast to bfloat16).
    """
    if grad_loss is None:
        return torch.zeros_like(stored)
    scale = grad_loss.reshape((-1,) + (1,) * (stored.dim() - 1)).float()
    if _traced(grad_loss):
        return (stored.float() * scale).to(stored.dtype)  # fused by the compiler
    if grad_loss.dim() == 0 and checks.on_host(grad_loss) and float(grad_loss) == 1.0:
        return stored  # reading a CPU scalar costs no synchronisation
    return torch.mul(stored, scale, out=stored)


def guard_stored_backward(ctx, grad_loss) -> None:
    """The checks of a backward that scales stored gradients in place (``ctx.used`` starts False): no
    double backward (only the first derivative is stored), no second backward (the stored gradient is
    used up). Marks ``ctx`` used."""
    if torch.is_grad_enabled() and not _traced(grad_loss if grad_loss is not None else torch.empty(0)):
        raise RuntimeError(
            "fastkd: double backward (create_graph=True) is not supported by the fused losses: they "
            "store only the first derivative. Use backend='reference' for higher-order gradients."
        )
    if ctx.used:
        raise RuntimeError(
            "fastkd: backward ran twice through the same fused loss (retain_graph=True?). The fused "
            "losses scale their stored gradient in place, so it can be used once; compute the loss "
            "again, or use backend='reference', to backpropagate through it twice."
        )
    ctx.used = True


def register_loss_autograd(op, grad_slots):
    """Register autograd for a fused loss op (a name like "fastkd::kd_fwd" or a custom op).

    ``grad_slots`` maps input positions to the output positions holding their
    stored gradients (output 0 is the loss). Every other input gets no gradient.
    """

    def setup_context(ctx, inputs, output):
        # The stored-gradient outputs get no incoming gradient; without this autograd
        # would zero-fill an [N, C] tensor for each of them on every backward.
        ctx.set_materialize_grads(False)
        ctx.num_inputs = len(inputs)
        # a tensor-list input (divergence_fwd's teacher_members) takes a list of gradients: all None
        ctx.list_inputs = {i: len(x) for i, x in enumerate(inputs)
                           if isinstance(x, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in x)}
        ctx.used = False
        # An unrequested gradient comes back as an empty tensor; a requested one has the
        # input's shape (which is also empty for an input with no rows).
        ctx.requested = [tuple(output[out].shape) == tuple(inputs[inp].shape) for inp, out in grad_slots.items()]
        # Detached: the stored gradients are outputs of this very op, so they carry its
        # grad_fn; the gradients handed to autograd must not (nor require grad themselves).
        ctx.save_for_backward(*(output[out].detach() for out in grad_slots.values()))

    def backward(ctx, grad_loss, *unused):
        guard_stored_backward(ctx, grad_loss)
        grads = [None] * ctx.num_inputs
        for i, n in ctx.list_inputs.items():
            grads[i] = [None] * n
        for inp, stored, requested in zip(grad_slots.keys(), ctx.saved_tensors, ctx.requested):
            if requested:
                grads[inp] = scale_stored_grad(stored, grad_loss)
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
