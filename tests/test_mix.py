"""Mixed views (pipeline.mix): the plan's draws, the pixels, the labels, the oracle (cached == the live teacher on
the replayed mixed view), FKD's approximation, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from pipeline import paths
from pipeline.augment import AugmentConfig, plan_views
from pipeline.config import build
from pipeline.data import DataConfig, load_split
from pipeline.distill import DistillConfig, TrainSet, build_trainer, train_one_epoch
from pipeline.methods import make_method, method_configs
from pipeline.mix import MixConfig, MixPlan, fkd_targets, mix_pixels, mixed_labels, plan_mix, tensor_views
from pipeline.models import build_model
from pipeline.cache.slabs import EpochReads
from pipeline.align import AlignConfig
from pipeline.views import ViewsConfig, make_view_plan, open_view_plan, write_view_plan
from helpers import TINY_TEACHERS, Recorder, build_tiny_pipeline, one_line_error, tiny_distill_params, tiny_targets

pytestmark = pytest.mark.usefixtures("one_thread")

CROP = AugmentConfig(kind="crop_flip", pad=2)


def draw(kind: str, n: int = 400, views: int = 4, **options) -> MixPlan:
    cfg = MixConfig(kind=kind, **options)
    aug = plan_views(CROP, 5, np.arange(n), np.arange(views), 28, 28)  # (n, V, 3)
    return MixPlan.with_views(plan_mix(cfg, 5, np.arange(n), np.arange(views), n, (28, 28)), aug)


# ---------------------------------------------------------------- the plan


def test_cutmix_draws_follow_timm_boxes_with_the_area_corrected_lambda():
    mix = draw("cutmix")
    top, left, h, w = (mix.box[..., k].astype(np.int64) for k in range(4))
    assert (mix.partner >= 0).all() and (mix.partner != np.arange(400)[:, None]).all()  # always a partner, never i
    assert ((top >= 0) & (left >= 0) & (top + h <= 28) & (left + w <= 28)).all()  # clipped to the view
    np.testing.assert_allclose(mix.lam, 1 - h * w / 784, rtol=0, atol=1e-7)  # lam = the area kept (timm's correct_lam)
    assert 0.6 < mix.lam.mean() < 0.8  # Beta(1, 1) before clipping pushes lam up (timm's too)
    aug = plan_views(CROP, 5, np.arange(400), np.arange(4), 28, 28)
    assert np.array_equal(mix.aug, aug[mix.partner, np.arange(4)])  # the partner through its own view v


def test_mixup_draws_beta_lambdas_and_no_box_and_prob_leaves_plain_views():
    mix = draw("mixup", mixup_alpha=0.4, prob=0.5)
    plain = mix.partner < 0
    assert 0.45 < plain.mean() < 0.55  # prob: the share of mixed views
    assert (mix.lam[plain] == 1).all() and (mix.box == 0).all()
    lam = mix.lam[~plain]
    assert 0.45 < lam.mean() < 0.55 and 0.2 < ((lam < 0.1) | (lam > 0.9)).mean()  # Beta(0.4, 0.4): U-shaped
    both = draw("both", switch_prob=0.25)
    cut = both.box[..., 2].astype(int) * both.box[..., 3] > 0
    assert 0.18 < cut.mean() < 0.3  # CutMix at switch_prob (a clipped-away box reads as no box)


def test_the_plan_is_a_pure_function_of_seed_sample_and_view(fashion_root):
    """Any split of the samples into blocks (the planner's, or ranks', or workers') gives the same bytes; the
    unmixed twin is exactly the plan without mixing, so a plain plan keeps its fingerprint."""
    data = load_split(DataConfig(root=str(fashion_root), limit=300), "train")
    cfg = ViewsConfig(num_views=3, mix={"kind": "both", "prob": 0.7})
    whole = make_view_plan(cfg, data)
    for block in (1, 7, 64):
        other = make_view_plan(cfg, data, block=block)
        assert other.fingerprint == whole.fingerprint
        for name in ("partner", "aug", "lam", "box"):
            assert np.array_equal(getattr(whole.mix, name), getattr(other.mix, name)), name
    plain = make_view_plan(ViewsConfig(num_views=3), data)
    assert whole.unmixed().fingerprint == plain.fingerprint and np.array_equal(whole.aug, plain.aug)
    assert plain.mix is None and "mix" not in plain.attrs
    assert make_view_plan(ViewsConfig(num_views=3, mix={"kind": "cutmix"}), data).fingerprint != whole.fingerprint


def test_a_mixing_plan_round_trips_and_a_changed_mix_array_is_caught(tmp_path, fashion_root):
    import zarr

    data = load_split(DataConfig(root=str(fashion_root), limit=100), "train")
    plan = make_view_plan(ViewsConfig(num_views=2, mix={"kind": "mixup"}), data)
    write_view_plan(plan, tmp_path / "views.zarr")
    back = open_view_plan(tmp_path / "views.zarr")
    assert back.fingerprint == plan.fingerprint and back.mix_config == MixConfig(kind="mixup")
    for name in ("partner", "aug", "lam", "box"):
        got, want = getattr(back.mix, name), getattr(plan.mix, name)
        assert np.array_equal(got, want) and got.dtype == want.dtype, name
    zarr.open_group(str(tmp_path / "views.zarr"), mode="r+")["mix/lam"][0, 0] = 0.5
    with pytest.raises(Exception, match="fingerprint"):
        open_view_plan(tmp_path / "views.zarr")


# ---------------------------------------------------------------- pixels and labels


def test_mixed_pixels_are_the_blend_or_the_pasted_box_and_plain_views_are_untouched():
    g = torch.Generator().manual_seed(0)
    own = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=g)
    other = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=g)
    mix = MixPlan(partner=torch.tensor([-1, 4, 5]), aug=torch.zeros(3, 3, dtype=torch.long),
                  lam=torch.tensor([1.0, 0.3, 0.75]), box=torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [2, 4, 4, 4]]))
    out = mix_pixels(own, other, mix)
    assert torch.equal(out[0], own[0])  # plain
    blend = (0.3 * own[1].double() + 0.7 * other[1].double()).round()
    assert (out[1].double() - blend).abs().max() <= 1  # mixup, rounded to uint8 as timm's fast collate does
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 4:8] = True
    assert torch.equal(out[2][:, inside], other[2][:, inside]) and torch.equal(out[2][:, ~inside], own[2][:, ~inside])


def test_mixed_labels_make_cross_entropy_the_lambda_mix_of_the_two_labels():
    labels = torch.tensor([0, 1, 2, 3])
    idx = torch.tensor([0, 2, 3])
    mix = MixPlan(partner=torch.tensor([1, -1, 0]), aug=torch.zeros(3, 3, dtype=torch.long),
                  lam=torch.tensor([0.25, 1.0, 0.6]), box=torch.zeros(3, 4, dtype=torch.long))
    target = mixed_labels(labels, idx, mix, 5)  # (3, 5)
    logits = torch.randn(3, 5)
    by_hand = torch.stack([0.25 * F.cross_entropy(logits[0], labels[0]) + 0.75 * F.cross_entropy(logits[0], labels[1]),
                           F.cross_entropy(logits[1], labels[2]),
                           0.6 * F.cross_entropy(logits[2], labels[3]) + 0.4 * F.cross_entropy(logits[2], labels[0])])
    torch.testing.assert_close(F.cross_entropy(logits, target), by_hand.mean())
    # label smoothing as timm's mixup_target does it: each one-hot smoothed (on = 1 - s + s/C, off = s/C), then mixed
    def smoothed(y):
        return F.one_hot(y, 5).float() * 0.9 + 0.1 / 5
    timm = torch.stack([0.25 * smoothed(labels[0]) + 0.75 * smoothed(labels[1]), smoothed(labels[2]),
                        0.6 * smoothed(labels[3]) + 0.4 * smoothed(labels[0])])
    torch.testing.assert_close(F.cross_entropy(logits, target, label_smoothing=0.1),
                               -(timm * logits.log_softmax(-1)).sum(-1).mean())


def test_fkd_targets_soften_to_the_linear_mix_of_the_two_soft_labels():
    own, other = torch.randn(2, 4, 10) * 3, torch.randn(2, 4, 10) * 3
    lam = torch.tensor([1.0, 0.2, 0.5, 0.9])
    for t in (1.0, 4.0):
        logits, blocks = fkd_targets(own, other, [own[..., :3]], [other[..., :3]], lam, t)
        want = lam[None, :, None] * torch.softmax(own / t, -1) + (1 - lam[None, :, None]) * torch.softmax(other / t, -1)
        torch.testing.assert_close(torch.softmax(logits / t, -1), want)
        torch.testing.assert_close(blocks[0], lam[None, :, None] * own[..., :3] + (1 - lam[None, :, None]) * other[..., :3])


def test_file_views_mix_like_the_tensor_source(tmp_path):
    """The file source decodes the partner in the same worker and mixes there: the same pixels as a tensor source
    holding the same images (boxes no larger than the view: the ops are shared, bit for bit)."""
    from PIL import Image

    from pipeline.data.files import FileData, file_views

    g = np.random.default_rng(0)
    images = g.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / f"{i}.png")
    data = FileData(root=tmp_path, files=[f"{i}.png" for i in range(6)], labels=torch.zeros(6, dtype=torch.long),
                    sizes=np.full((6, 2), 16), byte_sizes=np.zeros(6, np.int64), classes=["a"], name="png",
                    split="train", mean=(0.5,) * 3, std=(0.5,) * 3, image_size=16, workers=1)
    aug = AugmentConfig(kind="rrc_flip", scale_min=0.3)
    cfg = MixConfig(kind="both", prob=0.8)
    params = plan_views(aug, 1, np.arange(6), np.arange(3), 16, 16)  # (6, 3, 5)
    mix = MixPlan.with_views(plan_mix(cfg, 1, np.arange(6), np.arange(3), 6, (16, 16)), params)
    got = torch.cat(list(file_views(data, np.arange(6), params, aug, [np.arange(3), np.arange(3, 6)], mix=mix)))
    rows = torch.arange(6).repeat_interleave(3)
    views = torch.arange(3).repeat(6)
    want = tensor_views(torch.from_numpy(images), rows, torch.from_numpy(params)[rows, views].long(), aug,
                        mix.to(torch.device("cpu")).take(rows, views))
    assert torch.equal(got, want)
    assert (mix.partner >= 0).sum() > 5  # some views really are mixed


# ---------------------------------------------------------------- the oracle, through the stages


@pytest.fixture
def mixed_pipeline(tmp_path, fashion_root, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    params = tiny_distill_params(fashion_root, student_dropout=0.1, epochs=2, log_every=1,
                                 meal={"adversarial": "alternating"})
    params["views"]["mix"] = {"kind": "both", "prob": 0.9}
    build_tiny_pipeline(params)
    return params


@pytest.mark.parametrize("method", ["meal", "kd"])
def test_cached_targets_are_the_live_teachers_on_the_replayed_mixed_views(mixed_pipeline, method):
    params = mixed_pipeline
    train = load_split(build(DataConfig, params["data"], "data"), "train")
    plan = open_view_plan(paths.view_plan())
    assert plan.mix is not None and (plan.mix.partner >= 0).mean() > 0.7
    cfg = build(DistillConfig, {**params["distill"], "method": method}, "distill")
    options = method_configs(cfg, list(TINY_TEACHERS))[method]
    align_cfg = AlignConfig(**params["cache"]["align"])
    dev = torch.device("cpu")
    data = TrainSet(train.images, train.labels, plan.aug, plan.augment, train.mean, train.std, mix=plan.mix,
                    num_classes=10)

    def train_with(online: bool):
        distiller = make_method(method, options, list(TINY_TEACHERS))
        source = Recorder(tiny_targets(distiller, align_cfg, dev, online))
        torch.manual_seed(0)
        trainer = build_trainer(distiller, cfg, build_model("student_cnn", 10, 1, width=0.25, dropout=0.1), 10,
                                align_cfg, dev)
        for epoch in range(cfg.epochs):
            source.start_epoch(EpochReads.whole(epoch % 2, (epoch + 1) % 2))
            train_one_epoch(trainer, epoch, data, source, progress=False)
        return source

    cached, online = train_with(False), train_with(True)
    assert len(cached.seen) == len(online.seen) == 6
    for (_, tc), (_, to), xc, xo in zip(cached.seen, online.seen, cached.inputs, online.inputs):
        assert torch.equal(xc, xo)
        torch.testing.assert_close(tc.logits, to.logits, rtol=1e-3, atol=2e-3)
        for a, b in zip(tc.blocks or [], to.blocks or []):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_the_cache_does_not_depend_on_the_batch_size(mixed_pipeline):
    from pipeline.cache import open_cache
    from stages import cache_teachers

    before = open_cache(paths.teacher_cache("t1")).view_slab(1)
    paths.teacher_cache("t1").rename("t1-64.zarr")
    result = CliRunner().invoke(cache_teachers.main, ["--teacher", "t1", "--quiet", "--batch-size", "7"])
    assert result.exit_code == 0, result.output
    after = open_cache(paths.teacher_cache("t1")).view_slab(1)
    for name in before:
        assert np.array_equal(before[name], after[name]), name


def test_fkd_runs_from_the_unmixed_caches_and_refuses_in_one_line_without_them(mixed_pipeline):
    from stages import cache_teachers, distill

    runner = CliRunner()
    params = dict(mixed_pipeline, distill={**mixed_pipeline["distill"], "mix_targets": "fkd", "method": "kd"})
    with open("params.yaml", "w") as f:
        yaml.safe_dump(params, f)
    line = one_line_error(runner.invoke(distill.main, ["--quiet"]))
    assert "data/cache/unmixed/t1.zarr" in line and "--teacher t1 --unmixed" in line
    for t in TINY_TEACHERS:
        assert runner.invoke(cache_teachers.main, ["--teacher", t, "--unmixed", "--quiet"]).exit_code == 0
    result = runner.invoke(distill.main, ["--quiet"])
    assert result.exit_code == 0, result.output
    assert "(--online) see the mixed image itself" in one_line_error(runner.invoke(distill.main, ["--quiet", "--online"]))
    # the unmixed store is the plain plan's cache: the teacher on view aug[i, v] alone
    from pipeline.cache import open_cache

    with open_cache(paths.unmixed_teacher_cache("t1")) as cache:
        assert cache.attrs["view_plan_fingerprint"] == open_view_plan(paths.view_plan()).unmixed().fingerprint
    result = runner.invoke(cache_teachers.main, ["--teacher", "t1", "--unmixed", "--verify", "--recompute", "16"])
    assert result.exit_code == 0, result.output


def test_soft_labels_show_partner_and_lambda_and_inspect_draws_the_mixed_views(mixed_pipeline):
    from pipeline.cache import soft_labels
    from stages import inspect

    df = soft_labels([paths.teacher_cache(t) for t in TINY_TEACHERS])
    plan = open_view_plan(paths.view_plan())
    rows = df[(df.teacher == "t1")].set_index(["sample", "view"])
    for i, v in [(0, 0), (5, 1), (40, 1)]:
        row = rows.loc[(i, v)]
        j = int(plan.mix.partner[i, v])
        assert row.partner == j and row.lam == pytest.approx(float(plan.mix.lam[i, v]))
        assert row.partner_label == (plan.labels[j] if j >= 0 else -1)
    assert (df.p_partner.isna() == (df.partner < 0)).all()
    result = CliRunner().invoke(inspect.main, ["--plots", "plots"])
    assert result.exit_code == 0, result.output
    assert "plots/mixed_views.png" in result.output and (Path("plots") / "mixed_views.png").stat().st_size > 10_000


@pytest.mark.parametrize("mix,needle", [
    ({"kind": "cutmix", "cutmix_alpha": 0.0}, "views.mix.cutmix_alpha = 0.0 must be > 0"),
    ({"kind": "mixup", "mixup_alpha": -1.0}, "views.mix.mixup_alpha = -1.0 must be > 0"),
    ({"kind": "both", "prob": 1.5}, "views.mix.prob = 1.5 must be a probability in [0, 1]"),
    ({"kind": "both", "switch_prob": -0.1}, "views.mix.switch_prob = -0.1 must be a probability"),
    ({"kind": "cutmix", "prob": 0.0}, "views.mix.prob = 0 mixes no view"),
    ({"kind": "blend"}, "views.mix.kind"),
    ({"kind": "mixup", "beta": 1}, "beta"),
])
def test_bad_mix_values_end_in_one_line(tmp_path, fashion_root, monkeypatch, mix, needle):
    from stages import plan_views

    monkeypatch.chdir(tmp_path)
    params = tiny_distill_params(fashion_root)
    params["views"]["mix"] = mix
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert needle in one_line_error(CliRunner().invoke(plan_views.main, []))
    assert not (tmp_path / "data").exists()


def test_fkd_without_a_mixing_plan_and_unmixed_without_mixing_end_in_one_line(tmp_path, fashion_root, monkeypatch):
    from stages import cache_teachers, distill

    monkeypatch.chdir(tmp_path)
    params = tiny_distill_params(fashion_root, epochs=1, method="kd", mix_targets="fkd")
    build_tiny_pipeline(params)
    runner = CliRunner()
    assert "the view plan mixes none" in one_line_error(runner.invoke(distill.main, ["--quiet"]))
    assert "views.mix.kind is none" in one_line_error(runner.invoke(cache_teachers.main, ["--teacher", "t1", "--unmixed"]))
    params["distill"].update(shuffle="chunks")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert "needs distill.shuffle: full" in one_line_error(runner.invoke(distill.main, ["--quiet"]))


def test_one_sample_has_no_partner_to_mix_with():
    from pipeline.config import UserError

    with pytest.raises(UserError, match="needs at least 2 training samples"):
        plan_mix(MixConfig(kind="mixup"), 0, np.arange(1), np.arange(2), 1, (28, 28))
