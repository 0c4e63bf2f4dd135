"""A report from a small real sweep: tables, statistics, figures, unfinished jobs, refusal of mixed captures."""

import json
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from hydra import compose, initialize_config_dir

from tqlab import tasks
from tqlab.report.collect import ReportError

ROOT = Path(__file__).parents[2]
SYNTHETIC = [
    "data=synthetic",
    "data.seq_len=32",
    "data.sequences={train:2,validation:1,test:3}",
    "logger=none",
    "progress=false",
]


def evaluate(tmp_path, job, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose(config_name="eval", overrides=[*SYNTHETIC, *overrides])
    c.results_root, c.output_dir = str(tmp_path / "runs"), str(tmp_path / "sweep" / job)
    return tasks.evaluate(c).folder


def report_cfg(runs, out, **extra):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose(config_name="report", overrides=[f"runs={runs}", "wandb.mode=disabled"])
    c.output_dir = str(out)
    for k, v in extra.items():
        c[k] = v
    return c


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    for i, rotation in enumerate(["identity", "random_haar", "fast_hadamard"]):
        evaluate(tmp, str(i), f"rotation={rotation}", "bits=2")
    evaluate(tmp, "3", "rotation=random_haar", "bits=3")
    unfinished = tmp / "sweep" / "4" / ".hydra"
    unfinished.mkdir(parents=True)
    (unfinished / "overrides.yaml").write_text("- rotation=block_so8_static\n- bits=2\n")
    return tmp


def test_report_has_tables_statistics_and_figures(sweep):
    report = tasks.report(report_cfg(sweep / "sweep", sweep / "out"))
    text = report.read_text()
    assert "## Summary" in text and "## Paired comparisons" in text
    assert "Friedman p" in text and "Holm p" in text
    assert "- 4: rotation=block_so8_static bits=2\n" in text  # the unfinished job is named, on one line
    data = json.loads((sweep / "out" / "report.json").read_text())
    assert len(data["summary"]) == 4
    # three configurations at 2 bits → three pairs per metric, each over the 3 test sequences (the units)
    pairs = [p for p in data["paired"] if p["metric"] == "output_cosine"]
    assert len(pairs) == 3 and all(p["n"] == 3 and p["unit"] == "document" for p in pairs)
    pictures = sorted((sweep / "out").glob("*.png"))
    assert {p.stem for p in pictures} >= {
        "pareto_output_cosine",
        "pareto_attention_kl",
        "per_layer_output_cosine",
        "by_bits_output_cosine",
        "vs_random_haar_output_cosine",
    }
    for p in pictures:
        assert f"]({p.name})" in text
        image = mpimg.imread(p)
        assert image.shape[0] > 200 and image.std() > 0.01  # a drawn figure, not a blank canvas


def test_haar_beats_identity_on_outlier_keys_in_the_paired_table(sweep):
    tasks.report(report_cfg(sweep / "sweep", sweep / "out2"))
    data = json.loads((sweep / "out2" / "report.json").read_text())
    (pair,) = [
        p
        for p in data["paired"]
        if p["metric"] == "output_cosine"
        and {p["a"], p["b"]} == {"turboquant_mse · identity", "turboquant_mse · random_haar"}
    ]
    sign = 1 if pair["b"].endswith("random_haar") else -1
    assert sign * pair["median_diff"] > 0  # planted outlier channels: mixing helps


def test_mixed_captures_are_refused(tmp_path):
    evaluate(tmp_path, "0", "rotation=random_haar", "bits=2")
    evaluate(tmp_path, "1", "rotation=random_haar", "bits=2", "data.seed=7")  # another synthetic source
    with pytest.raises(ReportError, match="different captures"):
        tasks.report(report_cfg(tmp_path / "sweep", tmp_path / "out"))


def test_report_tables_and_figures_go_to_wandb_offline(sweep):
    from wandb_records import wandb_history

    c = report_cfg(sweep / "sweep", sweep / "out_wandb")
    c.wandb.mode = "offline"
    tasks.report(c)
    (run_file,) = (sweep / "out_wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = wandb_history(run_file)
    assert logged["summary/nrows"] == 4  # one row per configuration
    assert logged["paired/nrows"] == len(
        json.loads((sweep / "out_wandb" / "report.json").read_text())["paired"]
    )
    for figure in ("pareto_output_cosine", "per_layer_output_cosine", "vs_random_haar_output_cosine"):
        assert logged[f"{figure}/_type"] == "image-file" and logged[f"{figure}/width"] > 500


def test_undefined_values_are_counted_not_averaged_away(sweep):
    """A metric undefined on a block is left out of the means and tests, and counted per configuration."""
    from types import SimpleNamespace

    from tqlab.report.build import undefined_counts

    nan = float("nan")
    conf = SimpleNamespace(
        label="c", evals=[SimpleNamespace(rows=[{"m": 1.0}, {"m": nan}]), SimpleNamespace(rows=[{"m": nan}])]
    )
    whole = SimpleNamespace(label="d", evals=[SimpleNamespace(rows=[{"m": 0.5}])])
    assert undefined_counts([conf, whole], ["m"]) == [
        {"configuration": "c", "metric": "m", "undefined": 2, "blocks": 3}
    ]
    tasks.report(report_cfg(sweep / "sweep", sweep / "out3"))
    assert json.loads((sweep / "out3" / "report.json").read_text())["undefined"] == []  # none in this sweep


def test_pairs_of_fewer_than_two_units_have_no_p_and_stay_out_of_holm():
    """One haystack document gives n = 1 unit: no Wilcoxon p (not p = 1) and no share of the Holm correction,
    which the testable pairs of the same metric then carry alone."""
    from types import SimpleNamespace

    from tqlab.report.build import paired_tables

    def conf(label, values, documents):
        rows = [
            {"task": "niah", "document": d, "context": 64, "depth": 0.5, "found": v}
            for d, v in zip(documents, values, strict=True)
        ]
        return SimpleNamespace(label=label, setting=("key", 4, None), evals=[SimpleNamespace(rows=rows)])

    one = [conf(c, [v], ["doc"]) for c, v in (("a", 1.0), ("b", 0.0), ("c", 1.0))]
    text, records = paired_tables(one, ["found"], "document")
    assert "not testable" in text and all(r["n"] == 1 for r in records)
    assert all(r["p"] != r["p"] and r["p_holm"] != r["p_holm"] for r in records)  # NaN
    docs = [f"d{i}" for i in range(8)]
    many = [conf(c, [float(i % 2 == k) for i in range(8)], docs) for k, c in enumerate("ab")]
    _, (record,) = paired_tables(many, ["found"], "document")
    assert record["n"] == 8 and record["p"] == record["p_holm"]  # one testable pair: Holm leaves it


def test_a_report_mistake_prints_one_line_and_exits_2(sweep, capsys):
    from tqlab.cli import run_app
    from tqlab.tasks import report

    cfg = report_cfg(sweep / "sweep", sweep / "bad_report", metrics=["output_cosin"])
    with pytest.raises(SystemExit) as exit_:
        run_app(report, cfg)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: report.metrics has ['output_cosin'], which the results do not have")
