"""Autograd for the fused loss ops, shared by the compiled (cpu, cuda) and Triton backends.

Every fused op computes its input gradients in the forward pass (already
multiplied by the row weights), so backward only scales them by the incoming
gradient and skips even that when the incoming gradient is a scalar exactly 1.
"""
import torch


def scale_stored_grad(stored: torch.Tensor, grad_loss: torch.Tensor, reduce: bool):
    """d(final)/d(input) from the stored d(loss)/d(input) and the loss's incoming gradient.

    ``reduce=True``: ``grad_loss`` is 0-d. ``reduce=False``: it holds one value per row
    and scales the matching row (dim 0) of ``stored``.
    """
    if grad_loss is None:
        return torch.zeros_like(stored)
    if reduce:
        # Checking for exactly 1 needs the value on the host, so only plain eager tensors
        # are checked; traced graphs (fake / functional tensor subclasses) always multiply.
        if type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and bool(grad_loss == 1):
            return stored
        return stored * grad_loss.to(stored.dtype)
    shape = (-1,) + (1,) * (stored.dim() - 1)
    return stored * grad_loss.reshape(shape).to(stored.dtype)


def register_loss_autograd(op, grad_slots, reduce_arg=None):
    """Register autograd for a fused loss op.

    ``grad_slots`` maps input positions to the output positions holding their
    stored gradients (output 0 is the loss). ``reduce_arg`` is the input position
    of the ``reduce`` flag, or None for ops that always return a 0-d loss.
    """

    def setup_context(ctx, inputs, output):
        ctx.reduce = True if reduce_arg is None else bool(inputs[reduce_arg])
        ctx.num_inputs = len(inputs)
        # An unrequested gradient comes back as an empty tensor; a requested one has the
        # input's shape (which is also empty for an input with no rows).
        ctx.requested = [tuple(output[out].shape) == tuple(inputs[inp].shape) for inp, out in grad_slots.items()]
        ctx.save_for_backward(*(output[out] for out in grad_slots.values()))

    def backward(ctx, grad_loss, *unused):
        grads = [None] * ctx.num_inputs
        for inp, stored, requested in zip(grad_slots.keys(), ctx.saved_tensors, ctx.requested):
            if requested:
                grads[inp] = scale_stored_grad(stored, grad_loss, ctx.reduce)
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
