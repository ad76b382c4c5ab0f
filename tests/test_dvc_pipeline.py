"""The DVC pipeline: dvc.yaml matches the code, and the real `dvc repro` runs the tiny profile end to end.

`test_dvc_repro_end_to_end` copies the sources into a temporary git repository (profiles/tiny.yaml as
params.yaml, pointed at the tiny synthetic Fashion-MNIST), runs `dvc repro`, checks the outputs,
metrics and plots, that a second `dvc repro` does nothing, and that changing one teacher's params
reaches only that teacher's pretrain and cache, then distill and evaluate. About a minute on 2 cores.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import paths
from pipeline.report import PLOTS

REPO = Path(__file__).resolve().parents[1]
from pipeline.launch import STAGES as LAUNCHED

SOURCES = ("pipeline", "stages", "dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")


def stage_defs() -> dict[str, dict]:
    """dvc.yaml's stages, foreach stages by their `do` body."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: body.get("do", body) for name, body in stages.items()}


def pipeline_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """Source files of `module` and of every pipeline module it imports, directly or not (lazy imports too), with
    the `__init__.py` of every package on the way (importing pipeline.a.b runs pipeline/a/__init__.py first)."""
    seen = set() if seen is None else seen
    parts = module.split(".")
    for depth in range(1, len(parts)):  # the packages above the module
        pipeline_imports(".".join(parts[:depth]), seen)
    path = REPO.joinpath(*parts).with_suffix(".py")
    if not path.is_file():
        path = REPO.joinpath(*parts, "__init__.py")
    rel = path.relative_to(REPO).as_posix()
    if not path.is_file() or rel in seen:
        return seen
    seen.add(rel)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "pipeline" and name != "pipeline":
                pipeline_imports(name, seen)
            elif name == "pipeline" and isinstance(node, ast.Import):  # `import pipeline`: reads __init__
                pipeline_imports(name, seen)
    return seen


def code_deps(needed: set[str]) -> list[str]:
    """The deps that name `needed`: a package directory where every one of its .py files is needed (the stage
    imports it whole), the single files otherwise."""
    whole = sorted({f.rsplit("/", 1)[0] for f in needed if f.count("/") == 2
                    and all(p.relative_to(REPO).as_posix() in needed for p in (REPO / f).parent.glob("*.py"))})
    return whole + sorted(f for f in needed if not any(f.startswith(d + "/") for d in whole))


def test_every_stage_lists_the_code_it_imports():
    for name, body in stage_defs().items():
        words = body["cmd"].split()  # python -m stages.NAME ... | python -m pipeline.launch stages.NAME ...
        launched = words[2] == "pipeline.launch"
        module = words[3] if launched else words[2]
        assert module == f"stages.{name}", body["cmd"]
        assert launched == (module in LAUNCHED), f"{name} runs distributed through pipeline.launch, or not at all"
        needed = pipeline_imports(module) | (pipeline_imports("pipeline.launch") if launched else set())
        listed = [d for d in body["deps"] if d.startswith(("stages/", "pipeline/"))]
        assert listed == code_deps(needed), f"dvc.yaml stage {name}: code deps should be {code_deps(needed)}"


def test_the_dependency_check_can_fail():
    needed = pipeline_imports("stages.plan_views")
    assert "pipeline/views.py" in needed and "pipeline/__init__.py" in needed
    assert code_deps({"pipeline/methods/" + p.name for p in (REPO / "pipeline/methods").glob("*.py")}) == [
        "pipeline/methods"]
    assert code_deps({"pipeline/methods/base.py"}) == ["pipeline/methods/base.py"]  # not the whole package


def listed_params(params: dict) -> dict[str, list[str]]:
    """Every params key dvc.yaml lists, per stage instance, resolved for these params (${key}, ${item.method})."""
    out = {}
    for name, body in stage_defs().items():
        entries = {"pretrain": params.get("teachers"), "cache_teachers": params.get("teachers"),
                   "distill": params.get("distill", {}).get("runs")}.get(name, {None: {}})
        for key, item in (entries or {}).items():
            out[name if key is None else f"{name}@{key}"] = [
                k.replace("${key}", str(key)).replace("${item.method}", str((item or {}).get("method")))
                for k in body.get("params", [])]
    return out


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.name for p in (REPO / "profiles").glob("*.yaml"))])
def test_every_profile_holds_every_key_dvc_reads(profile):
    """DVC refuses a stage whose listed key is missing from the params: every profile must hold them all."""
    params = yaml.safe_load((REPO / (profile if profile == "params.yaml" else f"profiles/{profile}")).read_text())
    for stage, keys in listed_params(params).items():
        for key in keys:
            value = params
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"{profile}: {stage} reads {key}, which is missing"
                value = value[part]


def test_stage_outputs_are_the_paths_the_code_writes():
    s = stage_defs()
    key = "${key}"
    assert s["pretrain"]["outs"] == [str(paths.teacher_checkpoint(key))]
    assert list(s["pretrain"]["metrics"][0]) == [str(paths.teacher_metrics(key))]
    assert s["plan_views"]["outs"] == [str(paths.view_plan())]
    assert s["cache_teachers"]["outs"] == [str(paths.teacher_cache(key, "${cache.format}"))]
    assert s["distill"]["outs"] == [str(paths.student_dir(key))]  # every seed's checkpoint
    assert list(s["distill"]["metrics"][0]) == [str(paths.student_metrics(key))]
    assert list(s["evaluate"]["metrics"][0]) == [str(paths.evaluate_metrics())]
    assert list(s["evaluate"]["outs"][0]) == [str(paths.summary_report())]
    assert s["evaluate"]["plots"] == [str(paths.report_plot(p)) for p in PLOTS]
    for stage in ("pretrain", "distill"):  # small JSON metrics live in git, not in the DVC cache
        assert s[stage]["metrics"][0][str(next(iter(s[stage]["metrics"][0])))] == {"cache": False}


# ---------------------------------------------------------------- the real dvc repro


def run(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{output[-4000:]}")
    return output


def make_repo(tmp_path: Path, fashion_root: Path) -> Path:
    """A fresh git repository with the pipeline's sources and the tiny profile as params.yaml."""
    repo = tmp_path / "repo"
    for source in SOURCES:
        src, dst = REPO / source, repo / source
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    params["data"].update(root=str(fashion_root), limit=0)  # 512 train / 256 test synthetic images
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def dvc_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(tmp_path / "dvc-site-cache")  # DVC's state and index dbs stay in tmp
    env["OMP_NUM_THREADS"] = "1"  # tiny stages; two spinning threads on a shared 2-core box only slow them
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # stages' `python`
    env.pop("PYTHONPATH", None)  # the stages must import the copied sources (python -m puts cwd first)
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(key, None)
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


def changed_stages(repo: Path, env: dict[str, str]) -> set[str]:
    """Stage names `dvc status` reports as changed."""
    out = run([sys.executable, "-m", "dvc", "status", "--json"], repo, env)
    return set(json.loads(out[out.index("{"):]))


def test_dvc_repro_end_to_end(tmp_path, fashion_root):
    pytest.importorskip("dvc")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo, env = make_repo(tmp_path, fashion_root), dvc_env(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "pipeline"], repo, env)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    teachers, runs = list(params["teachers"]), list(params["distill"]["runs"])
    expected = ({f"pretrain@{t}" for t in teachers} | {f"cache_teachers@{t}" for t in teachers}
                | {f"distill@{r}" for r in runs} | {"plan_views", "evaluate"})
    assert set(run([*dvc, "stage", "list", "--name-only"], repo, env).split()) == expected

    # ---- first repro: everything runs
    out = run([*dvc, "repro"], repo, env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == expected, out[-3000:]
    for t in teachers:
        assert (repo / paths.teacher_checkpoint(t)).is_file()
        assert (repo / paths.teacher_cache(t, params["cache"]["format"])).is_dir()
    seeds = params["distill"]["seeds"]
    for r in runs:
        assert all((repo / paths.student_checkpoint(r, seed)).is_file() for seed in seeds)
    assert (repo / paths.view_plan()).is_dir() and (repo / "dvc.lock").is_file()
    payload = json.loads((repo / paths.evaluate_metrics()).read_text())
    assert set(payload["teachers"]) == set(teachers) and set(payload["students"]) == set(runs)
    for entry in [*payload["teachers"].values(), payload["ensemble"], *payload["students"].values()]:
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["params"] > 0 and entry["latency_ms"] > 0
    assert max(t["accuracy"] for t in payload["teachers"].values()) > 0.3  # trained teachers beat chance (0.1)
    # the acceptance keys: per run the seed statistics and fidelity, per teacher and ensemble top1
    for name, entry in payload["students"].items():
        assert {"top1_mean", "top1_std", "seeds", "agreement_mean", "gap_closed_mean"} <= set(entry), name
        assert [s["seed"] for s in entry["seeds"]] == seeds and entry["top1_std"] >= 0
        assert abs(entry["top1_mean"] - sum(s["top1"] for s in entry["seeds"]) / len(seeds)) < 1e-9
    assert payload["students"]["scratch"]["gap_closed_mean"] == 0.0
    assert all("top1" in entry for entry in [*payload["teachers"].values(), payload["ensemble"]])
    summary = (repo / paths.summary_report()).read_text()
    assert all(f"| {name} |" in summary for name in [*teachers, "ensemble", *runs])
    for name in PLOTS:
        assert (repo / paths.report_plot(name)).read_bytes()[:4] == b"\x89PNG"
    shown = run([*dvc, "metrics", "show", "--json"], repo, env)
    assert "students" in shown and "ensemble" in shown

    # ---- second repro: nothing to do
    out = run([*dvc, "repro"], repo, env)
    assert "Running stage" not in out, out[-3000:]
    assert changed_stages(repo, env) == set()

    # ---- one run's key changes: that run and evaluate, nothing else (dvc.yaml lists each run's own keys)
    original = yaml.safe_dump(params, sort_keys=False)
    params["distill"]["runs"]["kd"]["kd"] = {"temperature": 2.0}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed_stages(repo, env) == {"distill@kd", "evaluate"}
    params["distill"]["log_every"] = 7  # a key that changes no student reruns no run
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed_stages(repo, env) == {"distill@kd", "evaluate"}
    (repo / "params.yaml").write_text(original)
    params = yaml.safe_load(original)
    assert changed_stages(repo, env) == set()

    # ---- one teacher's params change: its pretrain; distill and evaluate read the teacher names
    changed, other = teachers[-1], teachers[0]
    params["teachers"][changed]["pretrain"]["lr"] = 0.07
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    downstream = {f"distill@{r}" for r in runs} | {"evaluate"}
    assert changed_stages(repo, env) == {f"pretrain@{changed}"} | downstream
    # retrained, the teacher reaches its own cache and nothing else upstream of distill
    run([*dvc, "repro", f"pretrain@{changed}"], repo, env)
    assert changed_stages(repo, env) == {f"cache_teachers@{changed}"} | downstream
    run([*dvc, "repro", f"cache_teachers@{changed}"], repo, env)
    after = changed_stages(repo, env)
    assert after == downstream
    assert not after & {f"pretrain@{other}", f"cache_teachers@{other}", "plan_views"}
