"""The methods and the adversarial game: who the student's gradient helps, what each method reads."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pipeline.align import AlignConfig, align
from pipeline.config import UserError, build
from pipeline.methods.discriminators import Discriminators, discriminator_loss, fooling_loss, teacher_probability
from pipeline.distill import DistillConfig, build_trainer, load_state, state_dict, train_step
from pipeline.methods.losses import grad_reverse, soften
from pipeline.methods import StudentOut, Targets, distill_teachers, make_method, method_configs
from pipeline.methods.games import Alternating, Cooperative, Reversal
from pipeline.models import build_model

TEACHERS = ["t1", "t2", "t3"]
ALIGN = AlignConfig("channel", 8)  # the tiny runs' alignment


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second spinning thread only slows them on a shared machine
    yield
    torch.set_num_threads(threads)


def options(method: str, **values):
    cfg = build(DistillConfig, {"method": method, method: values}, "distill")
    return method_configs(cfg, TEACHERS)[method]


# ---------------------------------------------------------------- the game's direction


def student_step(mode: str, disc: Discriminators, s: torch.nn.Parameter, t: torch.Tensor, lr: float = 20.0) -> None:
    """One SGD step on the student vectors alone, with the adversarial term as each mode builds it.

    The losses are batch means, so a row's gradient is 1/B of its own: hence the large step.
    """
    if mode == "alternating":
        loss = fooling_loss(disc, [s]).sum()
    elif mode == "reversal":
        loss = discriminator_loss(disc, [t], [grad_reverse(s, 1.0)])[0].sum()
    else:  # cooperative: D's own loss, minimised by the student too
        loss = discriminator_loss(disc, [t], [s])[0].sum()
    disc.zero_grad()
    loss.backward()
    with torch.no_grad():
        s -= lr * s.grad
    s.grad = None


@pytest.mark.parametrize("kind", ["mlp", "official"])
@pytest.mark.parametrize("mode,direction", [("alternating", +1), ("reversal", +1), ("cooperative", -1)])
def test_student_gradient_fools_d_in_the_true_game_and_helps_it_in_cooperative(mode, direction, kind):
    torch.manual_seed(0)
    disc = Discriminators({"d": 16}, kind)
    if kind == "official":  # biases up, so that no ReLU column starts clipped for every row
        for m in disc.discs[0].linears:
            torch.nn.init.constant_(m.bias, 0.5)
    teacher = torch.randn(64, 16) + 1.0
    s = torch.nn.Parameter(torch.randn(64, 16))
    before = teacher_probability(disc, [s])
    for _ in range(3):
        student_step(mode, disc, s, teacher)
    after = teacher_probability(disc, [s])
    assert direction * (after - before) > 1e-4, (mode, before.item(), after.item())


def tiny_trainer(mode: str):
    """A MEAL trainer whose student loss is the adversarial term alone, D frozen (lr 0) to measure the student."""
    torch.manual_seed(0)
    cfg = build(DistillConfig, {"method": "meal", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}, "distill")
    opts = options("meal", adversarial=mode, adv_weight=1.0, logit_weight=0.0, block_weights=[0.0, 0.0, 0.0],
                   logit_eta=0.0)
    method = make_method("meal", opts, TEACHERS[:2])
    student = build_model("student_cnn", 10, 1, width=0.25)
    trainer = build_trainer(method, cfg, student, 10, ALIGN, torch.device("cpu"))
    for opt in (trainer.opt, trainer.d_opt):
        for group in (opt.param_groups if opt is not None else []):
            if opt is trainer.d_opt:
                group["lr"] = 0.0  # a fixed D: only the student moves
            elif "lr_scale" in group:
                group["lr"] = group["lr_scale"] = 0.0  # cooperative: D's group in the student's SGD
    return trainer


def d_teacher_prob(trainer, x) -> float:
    with torch.no_grad():
        _, feats = trainer.student(x)
        vecs = [align(f, ALIGN) for f in feats]  # (B, 8) each, as the step aligns them
        return teacher_probability(trainer.discs, vecs).mean().item()  # D order: block1..3


@pytest.mark.parametrize("mode,direction", [("alternating", +1), ("reversal", +1), ("cooperative", -1)])
def test_training_step_moves_the_student_the_right_way(mode, direction):
    trainer = tiny_trainer(mode)
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    tgt = Targets(torch.randn(1, 32, 10), list(torch.rand(3, 1, 32, 8) * 3))
    d_before = {k: v.clone() for k, v in trainer.discs.state_dict().items()}
    trainer.student.eval()  # fixed BatchNorm statistics, so the probe sees only the weight change
    before = d_teacher_prob(trainer, x)
    for _ in range(3):
        names, _ = train_step(trainer, x, y, tgt)
    after = d_teacher_prob(trainer, x)
    assert all(torch.equal(v, trainer.discs.state_dict()[k]) for k, v in d_before.items())  # D did not move
    assert direction * (after - before) > 0, (mode, before, after)
    assert set(names) >= {"loss", "d_acc_block1", "d_loss_block3", "adv_block2"}


def test_alternating_step_trains_d_to_separate():
    torch.manual_seed(0)
    disc = Discriminators({"d": 8})
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2, betas=(0.5, 0.999))
    teacher, student = torch.randn(128, 8) + 2.0, torch.randn(128, 8)
    for _ in range(50):
        loss, acc = discriminator_loss(disc, [teacher], [student])
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    assert acc.item() > 0.9
    # adversarial samples (ANC): student rows labelled teacher pull D's student side up
    loss_plain, _ = discriminator_loss(disc, [teacher], [student])
    loss_adv, _ = discriminator_loss(disc, [teacher], [student], [student[:32]])
    assert loss_adv.item() > loss_plain.item()


def official_reference(d, x: torch.Tensor) -> torch.Tensor:
    """The official models/discriminator.py forward, written with 1x1 convolutions on (N, D, 1, 1):
    ReLU after conv1, conv2 and conv3, two output columns."""
    h = x[:, :, None, None]
    for m in d.linears:
        h = torch.relu(torch.nn.functional.conv2d(h, m.weight[:, :, None, None], m.bias))
    return h.view(len(x), -1)


def test_discriminator_shapes_per_output():
    disc = Discriminators({"a": 32, "logits": 10})
    assert [m.out_features for m in disc.discs[0].linears] == [16, 8, 1]
    assert [m.out_features for m in disc.discs[1].linears] == [5, 2, 1]
    assert disc.discs[0](torch.randn(5, 32)).shape == (5, 1)
    official = Discriminators({"a": 32, "logits": 10}, "official")
    assert [m.out_features for m in official.discs[1].linears] == [5, 2, 2]
    with pytest.raises(UserError, match="discriminator"):
        Discriminators({"a": 8}, "conv")


def test_official_discriminator_is_the_official_1x1_conv_stack():
    """D -> D/2 -> D/4 -> 2, ReLU after every layer including the last; BCE with logits on both columns
    against [1, 0] for student rows, [0, 1] for teacher rows (the official loss.discriminatorLoss)."""
    torch.manual_seed(0)
    disc = Discriminators({"a": 16, "logits": 10}, "official")
    t, s = [torch.randn(6, 16) + 1, torch.randn(6, 10) + 1], [torch.randn(6, 16), torch.randn(6, 10)]
    bce = torch.nn.BCEWithLogitsLoss()
    loss, acc = discriminator_loss(disc, t, s)
    for g, d in enumerate(disc.discs):
        torch.testing.assert_close(d(s[g]), official_reference(d, s[g]))
        scores = official_reference(d, torch.cat([s[g], t[g]]))  # the official order: student rows, then teacher
        target = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6)
        torch.testing.assert_close(loss[g], bce(scores, target))
        torch.testing.assert_close(acc[g], tie_half_accuracy(scores[:, 1] - scores[:, 0], target[:, 1]))
    assert (official_reference(disc.discs[0], torch.randn(50, 16)) >= 0).all()  # the final ReLU


def tie_half_accuracy(margin: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Right where the margin's sign matches the label, half right on a tie (margin exactly 0)."""
    right = ((margin > 0) & (teacher > 0)) | ((margin < 0) & (teacher == 0))
    return (right.float() + 0.5 * (margin == 0).float()).mean()


def test_a_tied_discriminator_reads_half_right():
    """The official D often ties (both columns clipped to 0): a dead D reads 0.5; one that separates with its
    student column alone (teacher rows tied at 0, student rows clearly student) reads 0.75, not 0.5."""
    disc = Discriminators({"a": 4}, "official")
    with torch.no_grad():
        for m in disc.discs[0].linears:
            m.weight.zero_()
            m.bias.zero_()
    t, s = torch.randn(8, 4), torch.randn(8, 4)
    loss, acc = discriminator_loss(disc, [t], [s])
    assert acc.item() == 0.5 and loss.item() == pytest.approx(math.log(2))
    last = disc.discs[0].linears[-1]
    with torch.no_grad():  # a student column that fires on the student rows only (their inputs are all > 0)
        disc.discs[0].linears[0].weight.fill_(1.0)
        disc.discs[0].linears[1].weight.fill_(1.0)
        last.weight[0].fill_(1.0)
    _, acc = discriminator_loss(disc, [-t.abs() - 1], [s.abs() + 1])
    assert acc.item() == 0.75


def test_discriminators_are_independent_mlps():
    """Each D is its own MLP D -> D/2 -> D/4 -> 1, LeakyReLU, no end activation; a gradient through one D's
    input reaches only its weights; frozen, none at all."""
    torch.manual_seed(0)
    disc = Discriminators({"a": 12, "b": 8})
    xs = [torch.randn(7, 12), torch.randn(7, 8)]
    for d, x in zip(disc.discs, xs):
        h = x
        for i, m in enumerate(d.linears):
            h = m(h)
            h = torch.nn.functional.leaky_relu(h, 0.2) if i < 2 else h
        torch.testing.assert_close(d(x), h)
    disc.discs[1](xs[1]).sum().backward()
    assert all(p.grad is None for p in disc.discs[0].parameters())
    assert all(p.grad is not None for p in disc.discs[1].parameters())
    disc.zero_grad(set_to_none=True)
    s = [x.clone().requires_grad_() for x in xs]
    fooling_loss(disc, s).sum().backward()
    assert all(v.grad is not None for v in s) and all(p.grad is None for p in disc.parameters())


@pytest.mark.parametrize("kind", ["mlp", "official"])
def test_discriminator_loss_adds_adversarial_samples_as_extra_teacher_rows(kind):
    """ANC's adversarial samples: A extra student vectors labelled teacher, added to D's 2B rows (not a
    relabelling of student rows D already sees); the loss is the mean over all 2B + A rows."""
    torch.manual_seed(0)
    disc = Discriminators({"a": 8, "b": 6}, kind)
    t, s = [torch.randn(16, 8) + 1, torch.randn(16, 6) + 1], [torch.randn(16, 8), torch.randn(16, 6)]
    extra = [v[:4] for v in s]
    loss, acc = discriminator_loss(disc, t, s, extra)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for g, d in enumerate(disc.discs):
        rows = torch.cat([t[g], s[g], extra[g]])
        label = torch.cat([torch.ones(16), torch.zeros(16), torch.ones(4)])
        scores = d(rows)
        if kind == "mlp":
            expected = bce(scores[:, 0], label)
            margin = scores[:32, 0]
        else:
            expected = bce(scores, torch.stack([1 - label, label], 1))
            margin = scores[:32, 1] - scores[:32, 0]
        torch.testing.assert_close(loss[g], expected)
        torch.testing.assert_close(acc[g], tie_half_accuracy(margin, label[:32]))


def test_fooling_loss_is_bce_against_the_teacher_label_through_a_fixed_d():
    torch.manual_seed(0)
    disc = Discriminators({"a": 12, "b": 12})
    s = [torch.randn(9, 12, requires_grad=True) for _ in range(2)]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    reference = torch.stack([bce(d(v)[:, 0], torch.ones(9)) for d, v in zip(disc.discs, s)])  # (G,)
    got = fooling_loss(disc, s)
    torch.testing.assert_close(got, reference)
    got.sum().backward()
    assert s[0].grad is not None and all(p.grad is None for p in disc.parameters())


@pytest.mark.parametrize("mode,cls", [("alternating", Alternating), ("reversal", Reversal),
                                      ("cooperative", Cooperative)])
def test_each_game_owns_its_optimizer_or_joins_the_students(mode, cls):
    trainer = tiny_trainer(mode)
    assert isinstance(trainer.game, cls)
    d_params = {id(p) for p in trainer.discs.parameters()}
    in_student = {id(p) for g in trainer.opt.param_groups for p in g["params"]} & d_params
    assert (trainer.d_opt is None) == (mode == "cooperative") and bool(in_student) == (mode == "cooperative")


def trained_steps(method: str, values: dict, steps: int = 3, device: str = "cpu", compile: bool = False):
    """(stat names, last stats, student and discriminator weights, on the CPU) after `steps` steps of a tiny
    trainer on `device` (compiled with `compile`), on the same seeded batches."""
    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = build(DistillConfig, {"method": method, "lr": 0.2, "compile": compile}, "distill")
    distiller = make_method(method, options(method, **values), TEACHERS)
    student = build_model("student_cnn", 10, 1, width=0.25, dropout=0.0)
    trainer = build_trainer(distiller, cfg, student, 10, ALIGN, dev)
    g = torch.Generator().manual_seed(1)
    rng = random.Random(0)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        logits, blocks = torch.randn(3, 16, 10, generator=g), torch.rand(3, 3, 16, 8, generator=g) * 2
        picked = distiller.pick(rng)
        tgt = Targets(logits[picked].to(dev), [blocks[picked][:, b].to(dev) for b in distiller.feature_blocks])
        names, stats = train_step(trainer, x.to(dev).contiguous(memory_format=torch.channels_last), y.to(dev), tgt)
    params = {**dict(trainer.student.named_parameters()), **(dict(trainer.discs.named_parameters()) if trainer.discs else {})}
    return names, stats.cpu(), {k: v.detach().cpu().clone() for k, v in params.items()}


def assert_trains_alike(run, reference, rtol: float, atol: float, params_atol: float) -> None:
    """Two `trained_steps` results: the same stat names, and stats and weights equal to the tolerances."""
    names, stats, params = run
    names_ref, stats_ref, params_ref = reference
    assert names == names_ref
    torch.testing.assert_close(stats, stats_ref, rtol=rtol, atol=atol)
    for k in params_ref:
        torch.testing.assert_close(params[k], params_ref[k], rtol=rtol, atol=params_atol, msg=k)


def test_step_under_bf16_autocast(monkeypatch):
    """On CUDA the step runs under bf16 autocast; simulated here on the CPU: the losses and D stay float32
    and the step trains as the float32 step does, to bf16 precision."""
    import pipeline.distill as distill_module

    plain = trained_steps("meal", {})
    monkeypatch.setattr(distill_module, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    bf16 = trained_steps("meal", {})
    assert bf16[0] == plain[0] and bf16[1].dtype == torch.float32 and torch.isfinite(bf16[1]).all()
    torch.testing.assert_close(bf16[1], plain[1], rtol=2e-2, atol=2e-3)
    for k, w in plain[2].items():  # bf16 keeps 8 bits of mantissa: within 2% of each weight's scale
        assert (bf16[2][k] - w).abs().max() <= 2e-2 * w.abs().max() + 1e-4, k  # + a floor for biases near 0


def test_compiled_step_is_two_graphs_and_trains_as_eager_does():
    """distill.compile: the student with its blocks' alignment, and the method's terms, each compile into one
    graph (no graph break), and train as the eager step does."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = trained_steps("meal", {}, steps=2, compile=True)
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 2
    assert_trains_alike(compiled, trained_steps("meal", {}, steps=2), 1e-4, 1e-6, 1e-5)


# ---------------------------------------------------------------- methods


def test_meal_draws_one_teacher_per_step_seeded():
    method = make_method("meal", options("meal"), TEACHERS)
    draws = [method.pick(random.Random(5)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2] and len(draws[0]) == 1  # a function of the seed
    rng = random.Random(0)
    seen = {method.pick(rng)[0] for _ in range(100)}
    assert seen == {0, 1, 2}
    assert method.feature_blocks == (0, 1, 2)
    # a discriminator on every block and on the logits, as the official code puts one on each output
    assert method.discriminators(10, [8, 8, 8]) == {"block1": 8, "block2": 8, "block3": 8, "logits": 10}
    assert make_method("meal", options("meal", adversarial="none"), TEACHERS).discriminators(10, [8] * 3) == {}


def test_meal_reads_only_the_blocks_it_uses():
    # without a game a block of weight 0 is neither aligned nor gathered; with one, its D still needs it
    no_game = make_method("meal", options("meal", adversarial="none", block_weights=[0.0, 1.0, 0.0]), TEACHERS)
    assert no_game.feature_blocks == (1,)
    assert make_method("meal", options("meal", block_weights=[0.0, 1.0, 0.0]), TEACHERS).feature_blocks == (0, 1, 2)
    logits_only = make_method("meal", options("meal", adversarial="none", block_weights=[0.0] * 3), TEACHERS)
    out = StudentOut(torch.randn(4, 10), None)
    assert logits_only.feature_blocks == ()
    assert set(logits_only.losses(out, Targets(torch.randn(1, 4, 10), None), torch.zeros(4, dtype=torch.long))) == {"sim_logits"}


def test_meal_losses_are_zero_when_the_student_is_the_teacher():
    method = make_method("meal", options("meal", similarity="l1", logit_similarity="kl"), TEACHERS)
    logits, vecs = torch.randn(4, 10), list(torch.rand(3, 4, 8))
    tgt = Targets(logits[None].clone(), [v[None].clone() for v in vecs])
    terms = method.losses(StudentOut(logits, vecs), tgt, torch.zeros(4, dtype=torch.long))
    assert set(terms) == {"sim_logits", "sim_block1", "sim_block2", "sim_block3"}
    assert all(abs(v.item()) < 1e-6 for v in terms.values())


def test_meal_v2_target_is_the_mean_of_teacher_softmaxes():
    method = make_method("meal_v2", options("meal_v2", d_input="probs"), TEACHERS)
    assert method.pick(random.Random(0)) == [0, 1, 2] and method.feature_blocks == ()
    t = torch.randn(3, 4, 10)
    mean = soften(t).mean(0)
    out = StudentOut(mean.log(), None)  # a student whose softmax equals the mean: soft CE = entropy
    terms = method.losses(out, Targets(t, None), torch.zeros(4, dtype=torch.long))
    entropy = -(mean * mean.log()).sum(-1).mean()
    assert terms["soft_ce"].item() == pytest.approx(entropy.item(), rel=1e-5)
    s, tv = method.disc_inputs(out, Targets(t, None))
    assert len(s) == len(tv) == 1 and s[0].shape == tv[0].shape == (4, 10)
    torch.testing.assert_close(tv[0], mean)
    assert method.discriminators(10, [8] * 3) == {"outputs": 10}
    # the official D input, the default: the student's raw logits against the mean of the teachers' raw logits
    official = make_method("meal_v2", options("meal_v2"), TEACHERS)
    s, tv = official.disc_inputs(out, Targets(t, None))
    torch.testing.assert_close(s[0], out.logits)
    torch.testing.assert_close(tv[0], t.mean(0))


def test_anc_method():
    method = make_method("anc", options("anc", teacher="t2", adv_sample_rate=0.25), TEACHERS)
    assert method.pick(random.Random(0)) == [1]
    assert method.feature_blocks == (2,) and method.discriminators(10, [4, 6, 8]) == {"block3": 8}
    assert method.adversarial_rows(32) == 8
    logits = torch.randn(4, 10)
    terms = method.losses(StudentOut(logits, [torch.rand(4, 8)]), Targets(logits[None], [torch.rand(1, 4, 8)]), None)
    assert terms["l2_logits"].item() == 0.0
    assert make_method("anc", options("anc", teacher="mean"), TEACHERS).pick(random.Random(0)) == [0, 1, 2]
    assert make_method("anc", options("anc"), TEACHERS).pick(random.Random(0)) == [0, 1, 2]  # mean by default


def test_kd_method_named_teacher_and_mean():
    assert make_method("kd", options("kd", teacher="t3"), TEACHERS).pick(random.Random(0)) == [2]
    method = make_method("kd", options("kd", temperature=2.0, alpha=1.0), TEACHERS)
    assert method.pick(random.Random(0)) == [0, 1, 2]
    same = torch.randn(3, 4, 10)
    same[:] = same[0]  # three identical teachers: their mean is each of them
    terms = method.losses(StudentOut(same[0], None), Targets(same, None), torch.zeros(4, dtype=torch.long))
    assert terms["kd_soft"].item() == pytest.approx(0.0, abs=1e-6) and terms["ce"].item() == 0.0


def test_scratch_method_needs_no_teacher():
    method = make_method("scratch", options("scratch"), TEACHERS)
    assert method.pick(random.Random(0)) == [] and method.teachers == [] and method.adversarial == "none"


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("values,needle", [
    ({"method": "fitnets"}, "distill.method"),
    ({"meal": {"adversarial": "wgan"}}, "distill.meal.adversarial"),
    ({"meal_v2": {"d_input": "features"}}, "distill.meal_v2.d_input"),
    ({"anc": {"adv_sample_rate": 1.0}}, "distill.anc.adv_sample_rate"),
    ({"kd": {"temperature": 0}}, "distill.kd.temperature"),
    ({"kd": {"teacher": "t9"}}, "distill.kd.teacher"),
    ({"scratch": {"label_smoothing": "a"}}, "wrong type"),
    ({"meal": {"typo": 1}}, "unknown key"),
    ({"epochs": 0}, "distill.epochs"),
])
def test_bad_values_are_one_line_user_errors(values, needle):
    with pytest.raises(UserError) as err:
        cfg = build(DistillConfig, values, "distill")
        method_configs(cfg, TEACHERS)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_teacher_list():
    cfg = build(DistillConfig, {"teachers": ["t2"]}, "distill")
    assert distill_teachers(cfg, TEACHERS) == ["t2"]
    assert distill_teachers(build(DistillConfig, {}, "distill"), TEACHERS) == TEACHERS
    with pytest.raises(UserError, match="not under `teachers`"):
        distill_teachers(build(DistillConfig, {"teachers": ["zz"]}, "distill"), TEACHERS)
    with pytest.raises(UserError, match="needs teachers"):
        distill_teachers(build(DistillConfig, {}, "distill"), [])


def test_checkpoint_with_other_discriminator_layout_is_one_line():
    """Discriminators saved per layer (an older version's checkpoint) cannot resume: a UserError, no traceback."""
    trainer = tiny_trainer("alternating")
    state = state_dict(trainer)
    state["discriminators"] = {f"weights.{i}": p.detach() for i, p in enumerate(trainer.discs.parameters())}
    with pytest.raises(UserError, match="--restart"):
        load_state(trainer, state)
    load_state(trainer, state_dict(trainer))  # its own state loads


# ---------------------------------------------------------------- the faithful forms against the official code


def test_cooperative_step_is_one_sgd_over_student_and_d_on_the_official_total():
    """The official main.py: total = sum_i gamma_i CE(out_i, teacher_i) + sum_i eta_i BCE(D_i(cat(s_i, t_i)));
    total.backward(); one optimizer.step() over the student and D (D's group at d_lr). Written by hand here
    on a copy of the models, one step of plain SGD from zero momentum, and compared with train_step."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    gammas, etas = [0.01, 0.05, 0.1], [1.0, 0.5, 1.0]
    cfg = build(DistillConfig, {"method": "meal", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, "distill")
    opts = options("meal", adversarial="cooperative", adv_weight=1.0, d_lr=0.01, d_weight_decay=5e-4,
                   discriminator="official", similarity="ce", logit_similarity="ce", block_weights=gammas,
                   block_eta=etas, logit_eta=2.0)
    method = make_method("meal", opts, TEACHERS)
    student = build_model("student_cnn", 10, 1, width=0.25)
    trainer = build_trainer(method, cfg, student, 10, ALIGN, torch.device("cpu"))
    ref_student, ref_discs = copy.deepcopy(trainer.student), copy.deepcopy(trainer.discs)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    tgt = Targets(torch.randn(1, 16, 10) * 3, list(torch.rand(3, 1, 16, 8) * 2))
    train_step(trainer, x.contiguous(memory_format=torch.channels_last), y, tgt)

    def ce(s, t):  # the official loss.CrossEntropy
        return -(F.log_softmax(s, dim=1) * F.softmax(t, dim=1)).sum(dim=1).mean()

    logits, feats = ref_student(x)
    outs = [align(f, ALIGN) for f in feats] + [logits]
    answers = [tgt.blocks[g][0] for g in range(3)] + [tgt.logits[0]]
    total = sum(w * ce(o, a) for w, o, a in zip(gammas + [1.0], outs, answers))
    target = torch.tensor([[1.0, 0.0]] * 16 + [[0.0, 1.0]] * 16)  # student rows, then teacher rows
    for eta, d, o, a in zip(etas + [2.0], ref_discs.discs, outs, answers):
        total = total + eta * F.binary_cross_entropy_with_logits(official_reference(d, torch.cat([o, a])), target)
    total.backward()
    with torch.no_grad():  # SGD's first step: momentum buffer = gradient; weight decay on the decayed groups
        for p in ref_student.parameters():
            p -= 0.1 * (p.grad + (5e-4 * p if p.dim() > 1 else 0.0))
        for p in ref_discs.parameters():
            p -= 0.01 * (p.grad + 5e-4 * p)
    for (k, p), q in zip(trainer.student.named_parameters(), ref_student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
    for p, q in zip(trainer.discs.parameters(), ref_discs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # and D's group follows the student's schedule at its own peak rate
    from pipeline.optim import set_lr

    set_lr(trainer.opt, 0.05)
    assert trainer.opt.param_groups[-1]["lr"] == pytest.approx(0.005)


def test_cooperative_discriminator_learns_on_a_tiny_run():
    """The official game trains D: its accuracy on the logits rises above chance within a few dozen steps
    (the game before the faithful forms held D at exactly 0.5)."""
    torch.manual_seed(0)
    cfg = build(DistillConfig, {"method": "meal", "lr": 0.05, "weight_decay": 5e-4}, "distill")
    opts = options("meal", adversarial="cooperative", adv_weight=1.0, d_lr=0.05, d_weight_decay=5e-4,
                   discriminator="official", block_weights=[0.0] * 3, block_eta=[0.0] * 3)
    method = make_method("meal", opts, TEACHERS)
    trainer = build_trainer(method, cfg, build_model("student_cnn", 10, 1, width=0.25), 10, ALIGN,
                            torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    accs = []
    for _ in range(40):
        x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        teacher = torch.nn.functional.one_hot(y, 10).float()[None] * 8  # confident teacher logits
        names, stats = train_step(trainer, x.contiguous(memory_format=torch.channels_last), y, Targets(teacher, None))
        accs.append(stats[names.index("d_acc_logits")].item())
    assert sum(accs[-10:]) / 10 > 0.6, accs


@pytest.mark.parametrize("arch", ["lenet4", "student_cnn", "resnet8"])
def test_anc_discriminator_sees_the_students_noise(arch):
    """ANC's z is the student's dropout, and D must see the noisy features: the last block a student returns
    is the very (noisy) feature its classifier reads, so the vector D gets carries the noise."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 1, dropout=0.5).train()
    x = torch.randn(8, 1, 28, 28)
    logits, feats = model(x)
    head = model.fc2 if arch == "lenet4" else model.head
    torch.testing.assert_close(head(feats[-1]), logits)  # the classifier reads the returned, noisy feature
    _, again = model(x)
    assert not torch.equal(feats[-1], again[-1])  # a fresh z per forward
    model.eval()
    _, clean = model(x)
    flat = feats[-1].flatten(2).amax(2) if feats[-1].dim() == 4 else feats[-1]  # dropped units / channels are 0
    assert (flat == 0).float().mean() > 0.3 and (clean[-1].flatten(1) != 0).any()
    vec = align(feats[-1], ALIGN)
    assert not torch.allclose(vec, align(clean[-1], ALIGN))  # the aligned vector D reads differs from the clean one


def test_anc_data_term_is_the_squared_distance_summed_over_classes():
    """L_data = E ||f_t(x) - f_s(x)||^2: summed over the classes, averaged over the batch (not averaged over
    the classes too, which weakens it C-fold against the adversarial term)."""
    method = make_method("anc", options("anc", teacher="t1"), TEACHERS)
    s, t = torch.randn(6, 10), torch.randn(1, 6, 10)
    terms = method.losses(StudentOut(s, [torch.rand(6, 8)]), Targets(t, [torch.rand(1, 6, 8)]), None)
    torch.testing.assert_close(terms["l2_logits"], ((t[0] - s) ** 2).sum(1).mean())


# ---------------------------------------------------------------- MEAL V2's ImageNet recipe, piece by piece


def official_discriminator_widths(outputs_size: int, k: int) -> list[int]:
    """MEAL V2's models/discriminator.py: conv1 D -> D // K, conv2 -> (D // K) // K, conv3 -> 2 (1x1 convs)."""
    first = outputs_size // k
    return [outputs_size, first, first // k, 2]


@pytest.mark.parametrize("dim,k", [(1000, 8), (1000, 2), (10, 2), (64, 4)])
def test_the_discriminator_widths_are_the_official_codes_for_any_reduction(dim, k):
    disc = Discriminators({"logits": dim}, "official", reduction=k)
    linears = disc.discs[0].linears
    assert [linears[0].in_features] + [m.out_features for m in linears] == official_discriminator_widths(dim, k)
    x = torch.randn(6, dim)
    torch.testing.assert_close(disc.discs[0](x), official_reference(disc.discs[0], x))
    if (dim, k) == (1000, 8):
        assert [m.out_features for m in linears] == [125, 15, 2]  # 1000 -> 125 -> 15 -> 2
    method = make_method("meal_v2", options("meal_v2", discriminator="official", d_reduction=k), TEACHERS)
    trainer = build_trainer(method, build(DistillConfig, {"method": "meal_v2"}, "distill"),
                            build_model("student_cnn", dim, 1, width=0.25), dim, ALIGN, torch.device("cpu"))
    assert [m.out_features for m in trainer.discs.discs[0].linears] == official_discriminator_widths(dim, k)[1:]


def test_the_step_schedule_is_multisteplr_stepped_once_an_epoch():
    """The official train loops: MultiStepLR(optimizer, milestones, gamma), scheduler.step() after each epoch;
    every optimizer step of epoch e runs at its rate."""
    from pipeline.optim import sgd_lr

    epochs, steps = 180, 7
    cfg = build(DistillConfig, {"method": "kd", "lr": 0.01, "schedule": "step", "milestones": [100],
                                "gamma": 0.1, "epochs": epochs}, "distill")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    official = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100], gamma=0.1)
    for epoch in range(epochs):
        want = opt.param_groups[0]["lr"]
        got = [sgd_lr(cfg, epoch * steps + i, steps, epochs) for i in range(steps)]
        assert got == pytest.approx([want] * steps, rel=1e-12), epoch
        opt.step()
        official.step()
    assert sgd_lr(cfg, 100 * steps - 1, steps, epochs) == 0.01
    assert sgd_lr(cfg, 100 * steps, steps, epochs) == pytest.approx(1e-3)
    two = build(DistillConfig, {"method": "kd", "schedule": "step", "milestones": [2, 5], "gamma": 0.5,
                                "epochs": 8}, "distill")
    assert [sgd_lr(two, e * 3, 3, 8) / two.lr for e in range(8)] == [1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


@pytest.mark.parametrize("values,fragment", [
    ({"schedule": "step"}, "must be increasing epochs in (0, 20]"),
    ({"schedule": "step", "milestones": [5, 3]}, "must be increasing"),
    ({"schedule": "step", "milestones": [30]}, "in (0, 20]"),
    ({"milestones": [5]}, "set schedule: step, or milestones: []"),
    ({"schedule": "step", "milestones": [5], "gamma": 0}, "distill.gamma = 0.0 must be in (0, 1]"),
])
def test_bad_step_schedules_are_one_line(values, fragment):
    with pytest.raises(UserError) as err:
        build(DistillConfig, {"method": "kd", "epochs": 20, **values}, "distill")
    assert fragment in err.value.message and "\n" not in err.value.message


def test_decay_all_decays_every_parameter_as_the_official_sgd():
    """decay_all: one group, weight decay on BatchNorm and biases too: one SGD step equals
    torch.optim.SGD(model.parameters(), weight_decay=wd), the official optimizers' call."""
    import copy

    from pipeline.optim import make_sgd, param_groups

    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1)
    ref = copy.deepcopy(model)
    cfg = build(DistillConfig, {"method": "kd", "lr": 0.1, "weight_decay": 0.01, "decay_all": True}, "distill")
    ours = make_sgd(param_groups(model, cfg.weight_decay, cfg.decay_all), cfg)
    official = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    x = torch.randn(4, 1, 28, 28)
    for m, opt in ((model, ours), (ref, official)):
        m(x)[0].sum().backward()
        opt.step()
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=k)
    assert len(param_groups(model, 0.01)) == 2  # the default: BatchNorm and biases undecayed


def test_the_new_keys_leave_old_identities_alone():
    """Keys added after checkpoints were made (the step schedule, decay_all, the shuffle, D's reduction) enter a
    run's or a teacher's identity only when set: at their defaults the identity is the one of before."""
    from pipeline.config import to_dict, without_defaults
    from pipeline.optim import LATER_KEYS
    from pipeline.pretraining import PretrainConfig

    before = {"lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs"}
    pre = without_defaults(to_dict(build(PretrainConfig, {}, "pretrain")), LATER_KEYS)
    assert before <= set(pre) and not set(LATER_KEYS) & set(pre)
    stepped = without_defaults(to_dict(build(PretrainConfig, {"schedule": "step", "milestones": [3]}, "pretrain")),
                               LATER_KEYS)
    assert stepped["milestones"] == [3]
