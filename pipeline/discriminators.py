"""Discriminators that tell teacher vectors from student vectors, and the losses of the game.

One small MLP per distilled block (MEAL's stacked discriminators) or on the final outputs (MEAL V2,
ANC's logits variant): D -> D/2 -> D/4 -> 1 logit, no activation after the last layer (the official
MEAL code ends in a ReLU, which clips the "student" side of its logit to 0; we do not copy that).

The label convention: 1 = teacher, 0 = student. `sigmoid(D(v))` is D's "teacher" probability.

The three ways to play (chosen per method with `adversarial`, see pipeline.methods):
- `alternating` (the paper's game): D steps on `discriminator_loss` with the student's vectors
  detached (`discriminator_step`, its gradient written by hand), then the student steps on its own
  loss plus `fooling_loss` (non-saturating: make D say "teacher"; its backward by hand too, and
  `fooling_loss_grad` gives it with its gradient for the graph-free step). Two optimizers, D with its
  own learning rate.
- `reversal`: one backward pass of `discriminator_loss` with the student's vectors behind
  `grad_reverse`, so D descends and the student ascends D's loss (the minimax form). Two optimizers.
- `cooperative` (the official MEAL code): `discriminator_loss` is simply added to the student's loss
  under one optimizer; the student's gradient then *helps* D tell it apart from the teacher.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SLOPE = 0.2  # LeakyReLU's negative slope in every hidden layer


class Discriminators(nn.Module):
    """G discriminators of the same input size D, one per name, run as one batched MLP.

    (G, N, D) -> (G, N) logits of "this vector came from a teacher". Group g is exactly the MLP
    D -> D/2 -> D/4 -> 1 with its own weights (initialised as nn.Linear initialises); batching the G
    of them into three `baddbmm` calls makes MEAL's per-block discriminators cost one small MLP's
    launch overhead instead of G (on the CPU that overhead, not the arithmetic, is the whole cost).
    All weights and biases live in one parameter, `flat`; `layers()` gives them per layer as views.
    """

    def __init__(self, names: list[str], dim: int):
        super().__init__()
        self.names = list(names)
        self._labels: dict[tuple, tuple[torch.Tensor, ...]] = {}  # discriminator_step's label columns
        widths = [dim, max(1, dim // 2), max(1, dim // 4), 1]
        tensors = []
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            layers = [nn.Linear(d_in, d_out) for _ in self.names]
            tensors.append(torch.stack([m.weight.detach().t() for m in layers]))  # (G, in, out)
            tensors.append(torch.stack([m.bias.detach()[None] for m in layers]))  # (G, 1, out)
        self.shapes = [t.shape for t in tensors]  # w1, b1, w2, b2, w3, b3
        # Every weight and bias in one tensor: the optimizer steps one tensor (fused Adam's per-tensor Python
        # work is most of its cost at this size) and the hand-written step writes one gradient buffer.
        self.flat = nn.Parameter(torch.cat([t.flatten() for t in tensors]))
        self._views: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # data_ptr -> no-grad views

    def layers(self, flat: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(weight (G, in, out), bias (G, 1, out))] per layer, as views of `flat` (default: the parameters;
        pass `flat.grad` for the gradients). Differentiable when grad mode is on."""
        parts = (self.flat if flat is None else flat).split([math.prod(shape) for shape in self.shapes])
        views = [p.view(shape) for p, shape in zip(parts, self.shapes)]
        return list(zip(views[0::2], views[1::2]))

    def _cached_layers(self, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`layers(flat)` made once per storage (no grad): the hand-written step's views, free to reuse."""
        key = flat.data_ptr()
        if key not in self._views:
            if len(self._views) > 4:  # a moved or reloaded module: drop views of storage it no longer holds
                self._views.clear()
            with torch.no_grad():
                self._views[key] = self.layers(flat)
        return self._views[key]

    @property
    def widths(self) -> list[int]:
        return [int(shape[2]) for shape in self.shapes[0::2]]

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """`x` (G, N, D) -> (G, N). `frozen`: no gradient reaches the weights (the student's turn)."""
        return self._activations(x.float(), self.layers(self.flat.detach() if frozen else None))[2][..., 0]

    # The alternating game's two halves by hand (discriminator_step, fooling_loss): the MLP is three
    # batched products, so its backward is three more and a transpose each. Written out, one D step and
    # the student's fooling term cost ~40 ops instead of ~110 through autograd, which on the CPU is most
    # of what the game adds to a small student's step (tests/test_methods.py checks them against autograd).
    # `_activations` and `_backward_from` run under no_grad (their callers': discriminator_step, and an
    # autograd.Function's forward and backward).

    def labels(self, n: int, teachers: int, adversarial_rows: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target (n,) float: 1 for the teacher rows and the adversarial rows, truth (n,) bool: the teacher
        rows, sign (n,) float: 1 - 2 target), made once per batch layout rather than on every step."""
        key = (n, teachers, adversarial_rows, device)
        if key not in self._labels:
            rows = torch.arange(n, device=device)
            target = (rows < teachers + adversarial_rows).float()
            self._labels[key] = (target, rows < teachers, 1.0 - 2.0 * target)
        return self._labels[key]

    def _activations(self, x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The forward pass keeping what the backward needs: each layer's input, each hidden pre-activation,
        and the logits (G, N, 1). `layers`: default the cached no-grad views (the hand-written paths);
        `forward` passes differentiable ones."""
        inputs, pre = [], []
        h = x
        layers = self._cached_layers(self.flat) if layers is None else layers
        last = len(layers) - 1
        for i, (w, b) in enumerate(layers):
            inputs.append(h)
            h = torch.baddbmm(b, h, w)  # (G, N, out)
            if i < last:
                pre.append(h)
                # LeakyReLU rather than ReLU: with inputs this small (D = 10..64) dead units would leave D
                # with almost no capacity; the slope keeps a gradient flowing to the student through every unit.
                h = F.leaky_relu(h, SLOPE)
        return inputs, pre, h

    def _backward_from(self, inputs: list[torch.Tensor], pre: list[torch.Tensor], grad: torch.Tensor,
                       weight_grads: bool) -> torch.Tensor | None:
        """Back through the MLP from d(objective)/d(logits) `grad` (G, N, 1).

        `weight_grads`: write the weights' and biases' gradients into `flat.grad` (made if missing) and
        return None; otherwise return d(objective)/d(input) (G, N, D)."""
        layers = self._cached_layers(self.flat)
        if weight_grads:
            if self.flat.grad is None:
                self.flat.grad = torch.empty_like(self.flat)
            grads = self._cached_layers(self.flat.grad)
        last = len(layers) - 1
        for i in range(last, -1, -1):
            if i < last:
                grad = torch.ops.aten.leaky_relu_backward(grad, pre[i], SLOPE, False)  # (G, N, out)
            if weight_grads:  # bmm rather than @: one op each, where matmul's 3-D path costs five
                torch.bmm(inputs[i].transpose(1, 2), grad, out=grads[i][0])  # (G, in, out)
                torch.sum(grad, 1, keepdim=True, out=grads[i][1])  # (G, 1, out)
            if i > 0 or not weight_grads:
                grad = torch.bmm(grad, layers[i][0].transpose(1, 2))  # (G, N, in)
        return None if weight_grads else grad


def discriminator_loss(
    discs: Discriminators, teacher: torch.Tensor, student: torch.Tensor, adversarial_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each D's binary cross-entropy on teacher (label 1) and student (label 0) vectors, and its accuracy.

    `teacher`, `student`: (G, B, D). Returns (loss (G,), accuracy (G,)). The first `adversarial_rows`
    student rows are ANC's "adversarial samples": student vectors labelled as teacher, a regulariser
    that keeps D from winning outright (the batch is already shuffled, so the first rows are a random
    subset). Accuracy is always measured against the true labels, on the device (no host sync).
    """
    logits = discs(torch.cat([teacher, student], dim=1))  # (G, 2B): one pass over both sides
    _, truth, sign = discs.labels(logits.shape[1], teacher.shape[1], adversarial_rows, logits.device)  # (2B,) each
    return _score(logits, sign, truth)


def _score(logits: torch.Tensor, sign: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D's logits (G, N) against the labels (N,) as `sign` = 1 - 2 target: (BCE averaged over N (G,),
    accuracy against the truth (G,)).

    BCE(x, y) = softplus((1 - 2y) x) for y in {0, 1}: two light ops where
    binary_cross_entropy_with_logits runs eight."""
    loss = F.softplus(logits * sign).mean(1)
    accuracy = ((logits.detach() > 0) == truth).float().mean(1)  # both sides weigh the same
    return loss, accuracy


def discriminator_step(discs: Discriminators, opt: torch.optim.Optimizer, teacher: torch.Tensor, student: torch.Tensor,
                       adversarial_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of D on `discriminator_loss` (summed over the G discriminators), with the gradient by hand.

    `teacher`, `student`: (G, B, D) float32, the student's already detached (call outside autocast: D's
    arithmetic is tiny). Writes D's gradient into `discs.flat.grad` and steps `opt`. Returns (loss (G,),
    accuracy (G,)) before the step, as `discriminator_loss` does.
    """
    b = teacher.shape[1]
    with torch.no_grad():
        x = torch.cat([teacher, student], dim=1)  # (G, 2B, D)
        n = x.shape[1]
        target, truth, sign = discs.labels(n, b, adversarial_rows, x.device)  # (2B,) each
        inputs, pre, logits = discs._activations(x)  # logits (G, 2B, 1)
        loss, accuracy = _score(logits[..., 0], sign, truth)  # (G,) each
        # d(sum_g mean_n BCE)/d(logit) = (sigmoid - target) / N
        discs._backward_from(inputs, pre, (torch.sigmoid(logits) - target[:, None]) / n, weight_grads=True)
    step_optimizer(opt)
    return loss, accuracy


def step_optimizer(opt: torch.optim.Optimizer) -> None:
    """`opt.step()`; for the discriminators' fused Adam over their one tensor, its fused kernel called directly.

    torch.optim's step is Python around one kernel call here: grouping tensors by device, hooks, a
    profiler range. Inside the training step (caches cold from the student's work) that measured 0.30 ms
    of MEAL's ~4 ms extra per step on this CPU, the kernel itself ~0.01 ms. The direct call updates the
    optimizer's own state ('step', 'exp_avg', 'exp_avg_sq'), so checkpoints and resumes are unchanged
    (tests/test_methods.py checks it against opt.step() bit for bit). Anything else, and the first step
    (which creates the state), goes through opt.step()."""
    group = opt.param_groups[0]
    params = group["params"]
    state = opt.state.get(params[0]) if len(params) == 1 else None
    if (not isinstance(opt, torch.optim.Adam) or len(opt.param_groups) != 1 or not state or not group.get("fused")
            or group["amsgrad"] or group["maximize"] or group.get("decoupled_weight_decay") or params[0].grad is None):
        opt.step()
        return
    beta1, beta2 = group["betas"]
    state["step"].add_(1)
    torch._fused_adam_(params, [params[0].grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
                       lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                       amsgrad=False, maximize=False)


class _Fooling(torch.autograd.Function):
    """BCE(D(s), teacher) per discriminator, differentiable in `s` only, with D's backward by hand."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, discs: Discriminators) -> torch.Tensor:
        _, pre, logits = discs._activations(student)  # logits (G, B, 1)
        ctx.save_for_backward(*pre, logits)
        ctx.discs = discs
        return F.softplus(-logits).mean((1, 2))  # (G,): BCE with label 1 is softplus(-logit)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        *pre, logits = ctx.saved_tensors
        return _fooling_backward(ctx.discs, pre, logits, (grad / logits.shape[1])[:, None, None]), None


def _fooling_backward(discs: Discriminators, pre: list[torch.Tensor], logits: torch.Tensor, scale) -> torch.Tensor:
    """d(scale * sum_g sum_n softplus(-logit))/d(input) (G, N, D): `scale` a number or (G, 1, 1)."""
    return discs._backward_from([], pre, (torch.sigmoid(logits) - 1.0) * scale, weight_grads=False)


def fooling_loss(discs: Discriminators, student: torch.Tensor) -> torch.Tensor:
    """The student's adversarial term in the alternating game: BCE(D(s), teacher), non-saturating.

    `student` (G, B, D) float32 -> (G,). D's weights are held fixed: the gradient reaches the student only.
    Under torch.compile (distill.compile) the plain autograd form, which the compiler fuses: the hand-written
    backward is for eager mode, where it saves ~70 op launches.
    """
    if torch.compiler.is_compiling():
        return F.softplus(-discs(student, frozen=True)).mean(1)
    return _Fooling.apply(student, discs)


def fooling_loss_grad(discs: Discriminators, student: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight * fooling_loss(discs, student)` (G,) and its sum's gradient with respect to `student` (G, B, D),
    without autograd (the closed-form step, pipeline.distill.train_step)."""
    with torch.no_grad():
        _, pre, logits = discs._activations(student)  # logits (G, B, 1)
        loss = F.softplus(-logits).mean((1, 2)).mul_(weight)  # (G,)
        return loss, _fooling_backward(discs, pre, logits, weight / logits.shape[1])


def teacher_probability(discs: Discriminators, vectors: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid(D(v)) per discriminator over a batch (G, B, D) -> (G,): how "teacher" D finds them."""
    with torch.no_grad():
        return torch.sigmoid(discs(vectors)).mean(1)
