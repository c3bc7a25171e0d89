"""PCGrad (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning"), ``loss.kind: pcgrad``.

The tasks' losses are summed with weight 1, but the shared parameters (the backbone) do not
take the plain sum of the task gradients: each task's gradient that conflicts with another
task's (negative dot product) is first projected onto the normal plane of that gradient, the
other tasks taken in a random order, and the projected gradients are summed. Parameters of one
task only (its head) take that task's gradient as usual. Each step costs one backward pass
per task present in the batch, plus one for the heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from must.weighting import LossWeighting, WeightingContext, register_weighting


def project_conflicting(
    grads: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """PCGrad's combined gradient of ``grads`` (one flattened task gradient per row): for
    each task i, ``g = g_i``; for every other task j in a random order, if ``g . g_j < 0``
    then ``g -= (g . g_j) / |g_j|^2 * g_j``; the result is the sum of the projected ``g``."""
    k = grads.shape[0]
    combined = torch.zeros_like(grads[0])
    for i in range(k):
        g = grads[i].clone()
        for j in torch.randperm(k, generator=generator).tolist():
            if j == i:
                continue
            dot = torch.dot(g, grads[j])
            if dot < 0:  # a zero g_j has dot 0: never divided by its zero norm
                g = g - dot / torch.dot(grads[j], grads[j]) * grads[j]
        combined += g
    return combined


class PCGrad(LossWeighting):
    """Equal weights, and gradient surgery on the shared parameters (see the module)."""

    owns_backward = True

    def __init__(self, tasks: list[str], seed: int = 0) -> None:
        super().__init__(tasks)
        # Its own generator, so the random task order leaves every other random draw as is.
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, losses):
        return sum(losses.values()), {t: 1.0 for t in losses}

    def backward(
        self,
        total: torch.Tensor,
        task_losses: Mapping[str, torch.Tensor],
        shared: Sequence[nn.Parameter],
        rest: Sequence[nn.Parameter],
    ) -> None:
        shared = [p for p in shared if p.requires_grad]
        if len(task_losses) < 2 or not shared:  # nothing can conflict
            total.backward()
            return
        rows = []
        for loss in task_losses.values():
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            # A task that does not reach a parameter (a level its head skips) adds 0 there.
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1)
                        for g, p in zip(grads, shared, strict=True)
                    ]
                )
            )
        combined = project_conflicting(torch.stack(rows), self.generator)
        if rest:  # each head takes its own task's gradient (other tasks' losses don't reach it)
            torch.autograd.backward(total, inputs=list(rest))
        offset = 0
        for p in shared:
            g = combined[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            p.grad = g.clone() if p.grad is None else p.grad + g

    def describe(self) -> dict:
        return {"kind": "pcgrad"}


@register_weighting("pcgrad")
def _pcgrad(ctx: WeightingContext) -> LossWeighting:
    return PCGrad(ctx.tasks, seed=ctx.train.seed)
