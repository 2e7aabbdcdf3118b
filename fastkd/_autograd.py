"""Autograd for the fused loss ops, shared by the compiled (cpu, cuda) and Triton backends.

Every fused op computes its input gradients in the forward pass (already
multiplied by the row weights), so backward only scales them by the incoming
gradient and skips even that when the incoming gradient is a scalar exactly 1.
"""
import torch


def _traced(x: torch.Tensor) -> bool:
    # fake / functional tensor subclasses while torch.compile or opcheck traces
    return type(x) is not torch.Tensor or torch.compiler.is_compiling()


def scale_stored_grad(stored: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """d(final)/d(input) from the stored d(loss)/d(input) and the loss's incoming gradient.

    ``grad_loss`` is 0-d (reduced loss) or holds one value per row, scaling the
    matching row (dim 0) of ``stored``. The product is computed in float32 and
    stored in the gradient's dtype, so a loss weight such as 0.9 is not first
    rounded to bfloat16 (a 0.2% bias on every gradient).
    """
    if grad_loss is None:
        return torch.zeros_like(stored)
    if grad_loss.dim() == 0:
        if _traced(grad_loss):
            return (stored.float() * grad_loss).to(stored.dtype)  # fused by the compiler
        g = float(grad_loss)  # one host sync, to skip a whole pass when g == 1
        return stored if g == 1.0 else stored * g  # a Python float multiplies at float32 precision
    rows = grad_loss.reshape((-1,) + (1,) * (stored.dim() - 1)).float()
    if _traced(grad_loss) or stored.dtype == torch.float32:
        return (stored.float() * rows).to(stored.dtype)
    return torch.mul(stored, rows, out=torch.empty_like(stored))


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
        # An unrequested gradient comes back as an empty tensor; a requested one has the
        # input's shape (which is also empty for an input with no rows).
        ctx.requested = [tuple(output[out].shape) == tuple(inputs[inp].shape) for inp, out in grad_slots.items()]
        ctx.save_for_backward(*(output[out] for out in grad_slots.values()))

    def backward(ctx, grad_loss, *unused):
        grads = [None] * ctx.num_inputs
        for inp, stored, requested in zip(grad_slots.keys(), ctx.saved_tensors, ctx.requested):
            if requested:
                grads[inp] = scale_stored_grad(stored, grad_loss)
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
