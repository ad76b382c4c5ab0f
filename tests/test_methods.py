"""The methods and the adversarial game: who the student's gradient helps, what each method reads."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.align import AlignConfig, align
from pipeline.config import UserError, build
from pipeline.discriminators import Discriminators, discriminator_loss, fooling_loss, teacher_probability
from pipeline.distill import DistillConfig, build_trainer, load_state, state_dict, train_step
from pipeline.losses import grad_reverse, soften
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
        loss = fooling_loss(disc, s).sum()
    elif mode == "reversal":
        loss = discriminator_loss(disc, t, grad_reverse(s, 1.0))[0].sum()
    else:  # cooperative: D's own loss, minimised by the student too
        loss = discriminator_loss(disc, t, s)[0].sum()
    disc.zero_grad()
    loss.backward()
    with torch.no_grad():
        s -= lr * s.grad
    s.grad = None


@pytest.mark.parametrize("mode,direction", [("alternating", +1), ("reversal", +1), ("cooperative", -1)])
def test_student_gradient_fools_d_in_the_true_game_and_helps_it_in_cooperative(mode, direction):
    torch.manual_seed(0)
    disc = Discriminators(["d"], 16)
    teacher = torch.randn(1, 64, 16) + 1.0
    s = torch.nn.Parameter(torch.randn(1, 64, 16))
    before = teacher_probability(disc, s)
    for _ in range(3):
        student_step(mode, disc, s, teacher)
    after = teacher_probability(disc, s)
    assert direction * (after - before) > 1e-4, (mode, before.item(), after.item())


def tiny_trainer(mode: str):
    """A MEAL trainer whose student loss is the adversarial term alone, D frozen (lr 0) to measure the student."""
    torch.manual_seed(0)
    cfg = build(DistillConfig, {"method": "meal", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}, "distill")
    opts = options("meal", adversarial=mode, adv_weight=1.0, logit_weight=0.0, block_weights=[0.0, 0.0, 0.0])
    method = make_method("meal", opts, TEACHERS[:2])
    student = build_model("student_cnn", 10, 1, width=0.25)
    trainer = build_trainer(method, cfg, student, 10, ALIGN, torch.device("cpu"))
    for opt in (trainer.opt, trainer.d_opt):
        for group in (opt.param_groups if opt is not None else []):
            if opt is trainer.d_opt or group.get("fixed_lr"):
                group["lr"] = 0.0  # a fixed D: only the student moves
    return trainer


def d_teacher_prob(trainer, x) -> float:
    with torch.no_grad():
        _, feats = trainer.student(x)
        vecs = [align(f, ALIGN) for f in feats]  # (B, 8) each, as the step aligns them
        return teacher_probability(trainer.discs, torch.stack(vecs)).mean().item()  # D order: block1..3


@pytest.mark.parametrize("mode,direction", [("alternating", +1), ("reversal", +1), ("cooperative", -1)])
def test_training_step_moves_the_student_the_right_way(mode, direction):
    trainer = tiny_trainer(mode)
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    tgt = Targets(torch.randn(1, 32, 10), torch.rand(1, 3, 32, 8) * 3)
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
    disc = Discriminators(["d"], 8)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2, betas=(0.5, 0.999))
    teacher, student = torch.randn(1, 128, 8) + 2.0, torch.randn(1, 128, 8)
    for _ in range(50):
        loss, acc = discriminator_loss(disc, teacher, student)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    assert acc.item() > 0.9
    # adversarial samples (ANC): student rows labelled teacher pull D's student side up
    loss_plain, _ = discriminator_loss(disc, teacher, student)
    loss_adv, _ = discriminator_loss(disc, teacher, student, adversarial_rows=32)
    assert loss_adv.item() > loss_plain.item()


def test_discriminator_shape():
    disc = Discriminators(["a", "b", "c"], 32)
    assert disc.widths == [16, 8, 1]
    assert disc(torch.randn(3, 5, 32)).shape == (3, 5)


def test_discriminator_bank_is_independent_mlps():
    """Group g of the batched bank is exactly its own MLP: D -> D/2 -> D/4 -> 1, LeakyReLU, no end activation."""
    torch.manual_seed(0)
    disc = Discriminators(["a", "b"], 12)
    x = torch.randn(2, 7, 12)
    for g in range(2):
        h = x[g]
        for i, (w, b) in enumerate(disc.layers()):
            h = h @ w[g] + b[g]
            h = torch.nn.functional.leaky_relu(h, 0.2) if i < 2 else h
        torch.testing.assert_close(disc(x)[g], h[:, 0])
    # a gradient through one group's input reaches only that group's weights
    disc(x)[1].sum().backward()
    assert all(w[0].abs().sum() == 0 and w[1].abs().sum() > 0 for w, _ in disc.layers(disc.flat.grad))
    # frozen: the student's turn gives D's weights no gradient at all
    disc.zero_grad(set_to_none=True)
    s = torch.randn(2, 7, 12, requires_grad=True)
    fooling_loss(disc, s).sum().backward()
    assert s.grad is not None and disc.flat.grad is None
    disc(s, frozen=True).sum().backward()
    assert disc.flat.grad is None


def test_discriminator_loss_matches_the_plain_formula():
    torch.manual_seed(0)
    disc = Discriminators(["a", "b"], 8)
    t, s = torch.randn(2, 16, 8) + 1, torch.randn(2, 16, 8)
    loss, acc = discriminator_loss(disc, t, s, adversarial_rows=4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    d_t, d_s = disc(t), disc(s)
    target_s = torch.zeros(16)
    target_s[:4] = 1
    for g in range(2):
        expected = 0.5 * (bce(d_t[g], torch.ones(16)) + bce(d_s[g], target_s))
        torch.testing.assert_close(loss[g], expected)
        torch.testing.assert_close(acc[g], 0.5 * ((d_t[g] > 0).float().mean() + (d_s[g] <= 0).float().mean()))



def test_fooling_loss_is_bce_against_the_teacher_label_through_a_fixed_d():
    torch.manual_seed(0)
    disc = Discriminators(["a", "b"], 12)
    s = torch.randn(2, 9, 12, requires_grad=True)
    reference = torch.nn.functional.binary_cross_entropy_with_logits(
        disc(s), torch.ones(2, 9), reduction="none").mean(1)  # (G,)
    got = fooling_loss(disc, s)
    torch.testing.assert_close(got, reference)
    got.sum().backward()
    assert s.grad is not None and disc.flat.grad is None


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
        every = Targets(torch.randn(3, 16, 10, generator=g), torch.rand(3, 3, 16, 8, generator=g) * 2)
        picked = distiller.pick(rng)
        tgt = Targets(every.logits[picked].to(dev), every.blocks[picked][:, list(distiller.feature_blocks)].to(dev))
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
        assert (bf16[2][k] - w).abs().max() <= 2e-2 * w.abs().max(), k


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
    assert method.discriminators(10, 8) == {"block1": 8, "block2": 8, "block3": 8}
    assert make_method("meal", options("meal", adversarial="none"), TEACHERS).discriminators(10, 8) == {}


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
    logits, vecs = torch.randn(4, 10), torch.rand(3, 4, 8)
    tgt = Targets(logits[None].clone(), vecs[None].clone())
    terms = method.losses(StudentOut(logits, vecs), tgt, torch.zeros(4, dtype=torch.long))
    assert set(terms) == {"sim_logits", "sim_block1", "sim_block2", "sim_block3"}
    assert all(abs(v.item()) < 1e-6 for v in terms.values())


def test_meal_v2_target_is_the_mean_of_teacher_softmaxes():
    method = make_method("meal_v2", options("meal_v2"), TEACHERS)
    assert method.pick(random.Random(0)) == [0, 1, 2] and method.feature_blocks == ()
    t = torch.randn(3, 4, 10)
    mean = soften(t).mean(0)
    out = StudentOut(mean.log(), None)  # a student whose softmax equals the mean: soft CE = entropy
    terms = method.losses(out, Targets(t, None), torch.zeros(4, dtype=torch.long))
    entropy = -(mean * mean.log()).sum(-1).mean()
    assert terms["soft_ce"].item() == pytest.approx(entropy.item(), rel=1e-5)
    s, tv = method.disc_inputs(out, Targets(t, None))
    assert s.shape == tv.shape == (1, 4, 10)
    torch.testing.assert_close(tv[0], mean)
    assert method.discriminators(10, 8) == {"outputs": 10}


def test_anc_method():
    method = make_method("anc", options("anc", teacher="t2", adv_sample_rate=0.25), TEACHERS)
    assert method.pick(random.Random(0)) == [1]
    assert method.feature_blocks == (2,) and method.discriminators(10, 8) == {"block3": 8}
    assert method.adversarial_rows(32) == 8
    logits = torch.randn(4, 10)
    terms = method.losses(StudentOut(logits, torch.rand(1, 4, 8)), Targets(logits[None], torch.rand(1, 1, 4, 8)), None)
    assert terms["l2_logits"].item() == 0.0
    assert make_method("anc", options("anc", teacher="mean"), TEACHERS).pick(random.Random(0)) == [0, 1, 2]


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
    state["discriminators"] = {f"weights.{i}": w.detach() for i, (w, _) in enumerate(trainer.discs.layers())}
    with pytest.raises(UserError, match="--restart"):
        load_state(trainer, state)
    load_state(trainer, state_dict(trainer))  # its own state loads
