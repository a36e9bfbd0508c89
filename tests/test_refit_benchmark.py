import json

import pandas as pd
import pytest
import yaml

from benchmarks import refit as refit_benchmark
from stages import balance, index, split
from stages.common import load_params, train_config
from tests.conftest import set_params


def test_learning_rates_come_from_dvclive_in_epoch_order():
    assert refit_benchmark.learning_rates("step\tlearning_rate\n1\t0.0005\n0\t0.001\n") == [0.001, 0.0005]
    assert refit_benchmark.learning_rates(None) is None


def test_an_experiment_of_another_split_is_refused():
    workspace = {"seed": 42, "split": {"val": 0.15}, "balance": {"total": "auto"}}
    refit_benchmark.check_same_data("a", {**workspace, "train": {"seed": 7}}, workspace)  # train.seed may differ
    with pytest.raises(SystemExit, match="b: params.yaml's seed .* trained on other data"):
        refit_benchmark.check_same_data("b", {**workspace, "seed": 7}, workspace)


@pytest.fixture
def experiment(raw, project, tmp_path, monkeypatch):
    """The stages up to balance on the synthetic data, and one 'DVC experiment' trained on them: its model in a
    DVC cache, its files as git would show them."""
    from stages import train

    set_params(project, profile="demo", **{"profiles.demo.epochs": 2, "profiles.demo.filters": 4,
                                           "split.val": 0.2, "split.test": 0.2})
    index.main()
    split.main()
    balance.main()
    params = load_params()
    summary = train.train(params["model"], train_config(params), params["seed"], project / "data",
                          tmp_path / "kept.keras", None)
    rates = summary.pop("learning_rates")
    md5 = "d" * 32
    cached = tmp_path / "repo/.dvc/cache/files/md5" / md5[:2] / md5[2:]
    cached.parent.mkdir(parents=True)
    (tmp_path / "kept.keras").rename(cached)
    files = {"params.yaml": yaml.safe_dump(params), "metrics/train.json": json.dumps(summary),
             "dvc.lock": yaml.safe_dump({"stages": {"train": {"outs": [{"path": "models/model.keras", "md5": md5}]}}}),
             refit_benchmark.RATES: "step\tlearning_rate\n" + "".join(f"{i}\t{r}\n" for i, r in enumerate(rates))}
    monkeypatch.setattr(refit_benchmark, "commits", lambda repo, names: {name: "rev" for name in names})
    monkeypatch.setattr(refit_benchmark, "git_show", lambda repo, rev, path: files.get(path))
    return tmp_path / "repo", summary


def test_a_refit_is_trained_scored_beside_the_kept_model_and_read_back(experiment, project, tmp_path, capsys,
                                                                       monkeypatch):
    repo, first = experiment
    workdir = tmp_path / "refit"
    refit_benchmark.main(["--repo", str(repo), "--exp", "exp-a", "--workdir", str(workdir)])

    out = capsys.readouterr().out
    assert "refit better in" in out and "patient by patient, runs pooled" in out
    trained = json.loads((workdir / "exp-a/refit/metrics/train.json").read_text())
    prepared = {name: pd.read_csv(workdir / f"data/prepared/{name}.csv") for name in ("train", "refit", "val")}
    assert trained["epochs"] == first["best_epoch"]
    assert trained["train_slices"] == len(prepared["train"]) + len(prepared["refit"])
    assert set(prepared["refit"]["patient"]) == set(prepared["val"]["patient"])  # the validation patients, balanced
    kept, refit = (json.loads((workdir / f"exp-a/{k}/metrics/eval.json").read_text()) for k in ("kept", "refit"))
    assert kept["model"]["refit"] is False and refit["model"]["refit"] is True
    # both chose on validation with the kept model: the same choice, and the same validation scores
    assert kept["postprocess"]["chosen_on_validation"] == refit["postprocess"]["chosen_on_validation"]
    assert kept["validation"] == refit["validation"]

    monkeypatch.setattr("stages.train.refit", lambda *a, **k: pytest.fail("a finished refit was trained again"))
    refit_benchmark.main(["--repo", str(repo), "--exp", "exp-a", "--workdir", str(workdir)])
    assert f"{refit['dice_volume_mean']:.3f}" in capsys.readouterr().out
