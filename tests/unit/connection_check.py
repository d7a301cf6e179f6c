"""One comparison for every width member's connection: a training module against the plain
equations of its reference (``model/width/*_reference.py``), in float64."""

from __future__ import annotations

import torch

# Both sides compute in float64 and differ only in operation order: a handful of roundings of
# u64 = 1.1e-16 on values O(1-10), far below 1e-10; a wrong term is O(1).
FP64_TOL = 1e-10


def read_write(connection, hidden: torch.Tensor, z: torch.Tensor):
    """``x, H'`` of one read and one write, the way a layer uses a connection."""
    x, saved = connection.read(hidden)
    return x, connection.write(z, saved)


def assert_same_connection(reference, module, hidden, z, grad_x, grad_out):
    """``reference(module, hidden, z)`` and ``read_write(module, hidden, z)`` give the same
    ``x`` and ``H'`` and the same gradients of ``hidden``, ``z`` and every module parameter."""
    results = []
    for forward in (reference, read_write):
        x, out = forward(module, hidden, z)
        torch.autograd.backward([x, out], [grad_x, grad_out])
        results.append((x.detach(), out.detach(), hidden.grad, z.grad,
                        {k: p.grad for k, p in module.named_parameters()}))
        hidden.grad = z.grad = None
        module.zero_grad(set_to_none=True)
    (ref_x, ref_out, ref_h, ref_z, ref_p), (x, out, g_h, g_z, g_p) = results
    for expected, actual, what in ((ref_x, x, "x"), (ref_out, out, "out"),
                                   (ref_h, g_h, "d hidden"), (ref_z, g_z, "d z")):
        torch.testing.assert_close(actual, expected, rtol=FP64_TOL, atol=FP64_TOL, msg=what)
    for name, expected in ref_p.items():
        torch.testing.assert_close(g_p[name], expected, rtol=FP64_TOL, atol=FP64_TOL, msg=name)
