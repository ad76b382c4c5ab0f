"""The speed benchmarks run end to end on tiny settings (their figures are measured on real sizes, not here)."""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["meal", "meal_v2"])
def test_bench_distill_throughput_runs(tmp_path, method):
    from bench.distill_throughput import main

    out = tmp_path / "bench.json"
    result = main(["--params", str(ROOT / "profiles" / "tiny.yaml"), "--method", method, "--samples", "96",
                   "--views", "2", "--rounds", "7", "--warmup", "2", "--batch-size", "32", "--device", "cpu",
                   "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["method"] == method
    assert set(saved["turn_times_s"]) == {"a_scratch", "b_cached", "c_online"}
    assert all(len(v) == 7 and min(v) > 0 for v in saved["turn_times_s"].values())
    # 96 images in batches of 32: 3 steps an epoch, so the 9 steps crossed into a new epoch (and view) twice
    # after the warm-up, and each epoch start was timed apart from the steps
    assert saved["block_steps"] == 3 and len(saved["b_over_a_per_block"]) == 2  # whole blocks of 3 steps
    assert all(len(v) == 2 for v in saved["epoch_start_s"].values())
    assert result["b_over_a"] > 0 and result["c_over_b"] > 0
    assert saved["teachers"] and saved["batch_size"] == 32


def test_bench_turns_of_several_steps(tmp_path):
    """--chunk 2 (what CUDA runs by default): 7 rounds become 4 turns of 2 steps, synced around each turn."""
    from bench.distill_throughput import main

    out = tmp_path / "bench.json"
    main(["--params", str(ROOT / "profiles" / "tiny.yaml"), "--samples", "96", "--views", "2", "--rounds", "7",
          "--warmup", "2", "--chunk", "2", "--batch-size", "32", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["chunk"] == 2 and all(len(v) == 4 for v in saved["turn_times_s"].values())
    # 3 steps an epoch, 2 warm-up + 8 timed steps: the timed ones crossed 3 epoch starts (steps 4, 7, 10)
    assert all(len(v) == 3 for v in saved["epoch_start_s"].values())
    assert saved["block_steps"] == 2 and len(saved["b_over_a_per_block"]) == 4


def test_bench_distill_throughput_breakdown(tmp_path):
    from bench.distill_throughput import main

    out = tmp_path / "bench.json"
    main(["--params", str(ROOT / "profiles" / "tiny.yaml"), "--samples", "64", "--views", "2", "--rounds", "2",
          "--batch-size", "32", "--device", "cpu", "--breakdown", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["turn_times_s"]) == {"a_scratch", "b_cached", "c_online", "d_no_game", "e_logits_only"}
    assert saved["vs_scratch"]["a_scratch"] == 1.0 and saved["vs_scratch"]["e_logits_only"] > 0


def test_bench_bad_input_is_one_error_line(capsys):
    from bench.common import run_main
    from bench.distill_throughput import main

    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main(["--params", "/nonexistent/params.yaml", "--device", "cpu"]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: params file /nonexistent/params.yaml not found") and "\n" not in err


def test_bench_scaleout_paper_figures_follow_from_the_counted_parameters(tmp_path):
    from bench.scaleout import main
    from pipeline.models import build_model, count_parameters

    est = main(["--params", str(ROOT / "profiles" / "gpu.yaml"), "--world", "1", "2", "8", "--out",
                str(tmp_path / "s.json")])
    assert est["bytes_per_pair_per_teacher"] == (10 + 3 * 64) * 2  # C logits + 3 blocks of L = 64, fp16
    assert est["store_GB_per_teacher"] == pytest.approx(50_000 * 16 * 404 / 1e9)
    assert est["student_params"] == count_parameters(build_model("resnet18", 10, 3))
    one, two, eight = est["rows"]
    assert one["distill_allreduce_MB_per_step"] == 0  # one process sends nothing
    grads = 4 * (est["student_params"] + max(r["discriminator_params"] for r in est["runs"].values()))
    assert two["distill_allreduce_MB_per_step"] == pytest.approx(grads / 1e6)  # ring: 2 (W - 1) / W = 1 at W = 2
    assert eight["distill_allreduce_MB_per_step"] == pytest.approx(1.75 * grads / 1e6)
    assert eight["distill_slab_MB_per_epoch"] == pytest.approx(one["distill_slab_MB_per_epoch"] / 8)
    assert json.loads((tmp_path / "s.json").read_text())["command"].startswith("python -m bench.scaleout")


def test_the_imagenet_plan_holds_the_file_source_and_chunked_targets(tmp_path):
    """profiles/imagenet.yaml on paper: 1,000 classes of full fp16 logits and three 32-value blocks per pair, the
    targets a rank holds flat in N under shuffle: chunks, and the epoch bound by decoding or by the GPU."""
    from bench.scaleout import main

    n = 1_281_167
    args = ["--params", str(ROOT / "profiles" / "imagenet.yaml"), "--images", str(n), "--classes", "1000",
            "--world", "1", "8", "--out", str(tmp_path / "i.json")]
    est = main([*args, "--decode-ms", "4", "--gpu-images-per-s", "3000", "--cores-per-gpu", "16"])
    one, eight = est["rows"]
    assert est["bytes_per_pair_per_teacher"] == (1000 + 3 * 32) * 2 and est["source"] == "files"
    assert est["store_GB_per_teacher"] == pytest.approx(n * 8 * 2192 / 1e9)
    assert one["targets_MB_held_chunks"] == pytest.approx(2 * 2192 * (17 * 8192 + 16 * 8192) / 1e6)
    assert one["targets_MB_held_full"] == pytest.approx(2 * 2192 * 2 * n / 1e6)  # every sample, twice
    assert one["decode_images_per_s_per_gpu"] == 4000 and one["bound"] == "gpu"
    assert eight["epoch_s"] == pytest.approx(n / (8 * 3000))
    slow = main([*args, "--decode-ms", "8", "--gpu-images-per-s", "3000"])["rows"][1]
    assert slow["bound"] == "decode" and slow["epoch_s"] == pytest.approx(n / (8 * 2000))
    assert "--images 1281167" in json.loads((tmp_path / "i.json").read_text())["command"]


def test_readme_scaleout_figures_are_the_benchs():
    from bench.scaleout import estimate

    est = estimate(str(ROOT / "profiles" / "gpu.yaml"), [2, 8])
    two, eight = est["rows"]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Scale-out"):readme.index("## The zoo")]
    for figure in (f"{est['store_GB_per_teacher']:.2f} GB per teacher", f"{est['stores_GB_total']:.2f} GB for the five",
                   f"{est['student_params']:,} parameters", f"{two['distill_allreduce_MB_per_step']:.1f} MB at W = 2",
                   f"{eight['distill_allreduce_MB_per_step']:.1f} MB at W = 8",
                   f"{eight['distill_allreduce_GB_per_epoch']:.1f} GB per rank per epoch",
                   f"{eight['pretrain_allreduce_MB_per_step']['dpn92']:.0f} MB per rank and step at W = 8"):
        assert figure in section, figure


def test_bench_files_runs(tmp_path):
    """Both parts on tiny generated folders: every stage's peak memory and the side-by-side cache speeds."""
    from bench.files import main

    out = tmp_path / "files.json"
    result = main(["--images", "30", "--small", "20", "--views", "2", "--size", "16", "--workers", "0", "1",
                   "--repeats", "2", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python -m bench.files") and set(saved["memory"]) == {"20", "30"}
    for stage in ("plan_views", "cache_teachers", "distill"):
        assert 50 < saved["memory"]["30"][stage]["peak_pss_mib"] <= saved["memory"]["30"][stage]["peak_rss_mib"]
    assert set(result["cache_speed"]["files"]) == {"0", "1"} and result["cache_speed"]["memory_views_per_s"] > 0
    speeds = result["distill_speed"]["files"]
    assert set(speeds) == {f"workers {w} prefetch {p}" for w in (0, 1) for p in (2, 4)}
    assert all(v["images_per_s"] > 0 for v in speeds.values()) and result["distill_speed"]["best_files"] in speeds
    assert 0 < result["decode"]["decode_and_view_224_ms"]
    mixed = main(["--images", "30", "--small", "20", "--views", "2", "--size", "16", "--workers", "1", "--repeats", "1",
                  "--workdir", str(tmp_path / "work"), "--out", str(out), "--mix", "cutmix"])["mix_speed"]
    assert all(mixed[s]["mixed_views_per_s"] > 0 and mixed[s]["mixed_to_unmixed"] > 0 for s in ("memory", "files"))
    saved = json.loads(out.read_text())  # part C joins the file, parts A and B kept
    assert saved["mix_speed"]["mix"] == "cutmix" and set(saved["memory"]) == {"20", "30"} and "cache_speed" in saved
