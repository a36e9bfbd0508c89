"""The whole DVC pipeline on synthetic data with the demo profile, as `./run.sh demo` runs it:
`dvc exp run`, then another architecture as an experiment, then the comparison commands."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACKED = ["stages", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore", "data/.gitignore"]


def run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("pipeline")
    for name in TRACKED:
        src, dest = ROOT / name, repo / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
    shutil.rmtree(repo / "stages/__pycache__", ignore_errors=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(repo),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "pipeline"], repo, env)
    demo = ["-S", "data.source=synthetic", "-S", "profile=demo", "-S", "data.synthetic.patients=6",
            "-S", "data.synthetic.slices=12", "-S", "profiles.demo.epochs=1"]
    run(["dvc", "exp", "run", "-n", "demo-unet", *demo], repo, env)
    return repo, env, demo


def test_demo_pipeline_writes_every_output(repo):
    repo, env, _ = repo
    for path in ["data/raw/kaggle_3m/data.csv", "data/index.csv", "data/split.csv", "data/prepared/train.csv",
                 "models/model.keras", "models/selection.keras", "metrics/train.json", "metrics/per_patient.csv",
                 "metrics/per_patient_validation.csv", "plots/roc.csv",
                 "plots/confusion.csv", "plots/overlays/worst.png", "dvclive/train/plots/metrics/eval/loss.tsv"]:
        assert (repo / path).exists(), path
    scores = json.loads((repo / "metrics/eval.json").read_text())
    assert 0 <= scores["dice_volume_mean"] <= 1 and scores["data_source"].startswith("synthetic")
    assert json.loads((repo / "metrics/data.json").read_text())["source"] == "synthetic"
    assert "up to date" in run(["dvc", "status"], repo, env)


def test_another_architecture_as_an_experiment_and_comparisons(repo):
    repo, env, demo = repo
    run(["dvc", "exp", "run", "-n", "demo-resunet", *demo, "-S", "model=resunet"], repo, env)
    table = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    names = json.dumps(table)
    assert "demo-unet" in names and "demo-resunet" in names and "dice_volume_mean" in names
    assert json.loads((repo / "metrics/train.json").read_text())["model"] == "resunet"
    diff = run(["dvc", "metrics", "diff", "demo-unet", "demo-resunet", "--json"], repo, env)
    assert "dice_volume_mean" in diff
    html = run(["dvc", "plots", "show", "-o", str(repo / "dvc_plots")], repo, env)
    assert (repo / "dvc_plots/index.html").is_file(), html
    # each experiment carries its curves, ROC and confusion (git) and overlays (DVC cache), so they compare
    plots = json.loads(run(["dvc", "plots", "diff", "demo-unet", "demo-resunet", "--json"], repo, env))
    assert not plots.get("errors"), plots.get("errors")
    named = ("Loss per epoch", "Dice per epoch", "Per-volume Dice of the validation patients per epoch",
             "ROC of tumour detection", "Confusion of tumour detection")
    for name in named:
        assert plots["data"][name], name
    overlays = {f"plots/overlays/{n}.png" for n in ("best", "median", "worst")}
    assert set(plots["data"]) - set(named) == overlays  # no stray default charts of the same files
    images = {p["url"] for key in overlays for p in plots["data"][key] if p["type"] == "image"}
    assert len(images) == 6  # best, median, worst of each experiment


def test_refit_as_an_experiment_trains_again_on_the_validation_patients(repo):
    repo, env, demo = repo
    run(["dvc", "exp", "run", "-n", "demo-refit", *demo, "-S", "train.refit=true"], repo, env)
    trained = json.loads((repo / "metrics/train.json").read_text())
    balanced = json.loads((repo / "metrics/balance.json").read_text())
    assert trained["refit"]["epochs"] == trained["best_epoch"]
    assert trained["refit"]["train_slices"] == balanced["train"]["slices"] + balanced["refit"]["slices"]
    assert json.loads((repo / "metrics/eval.json").read_text())["model"]["refit"] is True
    assert (repo / "models/model.keras").read_bytes() != (repo / "models/selection.keras").read_bytes()
    assert "up to date" in run(["dvc", "status"], repo, env)


def test_architecture_table_lists_each_experiment_with_its_metrics(repo):
    repo, env, demo = repo
    if "demo-resunet" not in run(["dvc", "exp", "list", "--name-only"], repo, env):
        run(["dvc", "exp", "run", "-n", "demo-resunet", *demo, "-S", "model=resunet"], repo, env)
    table = run([sys.executable, "-m", "benchmarks.architectures", "--repo", str(repo)], ROOT, env)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert {"demo-unet", "demo-resunet"} <= set(rows)  # with demo-refit where that test ran first
    assert set(rows) == set(run(["dvc", "exp", "list", "--name-only"], repo, env).split())
    for name in rows:
        scores = json.loads(run(["git", "show", f"{exp_ref(repo, env, name)}:metrics/eval.json"], repo, env))
        assert f"**{scores['dice_volume_mean']:.3f}**" in rows[name]


def exp_ref(repo, env, name):
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).split()
    return next(ref for ref in refs if ref.endswith("/" + name))
