"""The report on results folders written here with a known structure, checked against scipy and numpy:
paired tests on unit means (not correlated windows), seeds grouped, the document unit, labels, one colour
per configuration in every figure."""

import csv
import json
import math
import re
import warnings

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from scipy import stats

from tqlab.report import build
from tqlab.report.collect import Evaluation, ReportError

LAYERS, HEADS, WINDOWS = 3, 4, 8
DOCUMENTS = ["Alpha", "Beta", "Beta", "NaN", "1984", "1984", "Gamma", "Delta"]  # titles of windows 0..7
METRICS = ["output_cosine", "key_rel_mse"]
FITTED = "fitted:fast_hadamard+block_so8_learned"
# name: (kv, k_bits, v_bits, k_rotation, v_rotation, seeds, shift of the per-unit effects)
CONFIGS = {
    "haar": ("key+value", 2, 2, "random_haar", "random_haar", [0, 1, 2], 0.0),
    "hadamard": ("key+value", 2, 2, "fast_hadamard", "fast_hadamard", [0], 0.01),
    "fitted": ("key+value", 2, 2, FITTED, "random_haar", [3], 0.02),
    "k_haar": ("key", 2.5, None, "random_haar", None, [0], 0.0),
    "k_hadamard": ("key", 2.5, None, "fast_hadamard", None, [0], 0.005),
}


def _columns(kv, k_bits, v_bits, k_rotation, v_rotation, seed, **extra) -> dict:
    return {
        "model": "tiny",
        "data": "synthetic",
        "capture": "c0ffee",
        "codec": "turboquant_mse",
        "kv": kv,
        "k_bits": k_bits,
        "v_bits": v_bits,
        "k_rotation": k_rotation,
        "v_rotation": v_rotation,
        "view": None,
        "rotations_from": "outputs/train/run7" if k_rotation == FITTED else None,
        "seed": seed,
        **extra,
    }


def write_eval(folder, columns: dict, values: dict[str, np.ndarray], document: bool = True) -> None:
    """results.csv (one row per (layer, head, window) block) and summary.json, as the eval task writes them."""
    folder.mkdir(parents=True)
    rows = []
    for layer, head, w in np.ndindex(LAYERS, HEADS, WINDOWS):
        block = {"layer": layer, "kv_head": head, "sequence": w}
        block |= {"document": DOCUMENTS[w]} if document else {}
        rows.append({**columns, **block, **{m: float(v[layer, head, w]) for m, v in values.items()}})
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    bits = [b for b in (columns["k_bits"], columns["v_bits"]) if b is not None]
    overall = {m: float(v.mean()) for m, v in values.items()}
    overall |= {"kv_bits_per_coordinate": (sum(bits) + 16 * (2 - len(bits))) / 2, "kv_bytes_per_token": 100.0}
    (folder / "summary.json").write_text(json.dumps({"columns": columns, "overall": overall}))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Windows of one (layer, head) share that head's effect of a configuration (and of a seed), so their
    paired differences are strongly correlated; returns the folder and the values written per (config, seed)."""
    root = tmp_path_factory.mktemp("units")
    rng = np.random.default_rng(0)
    shape = (LAYERS, HEADS, WINDOWS)
    base = {m: rng.normal(0.9, 0.03, shape) for m in METRICS}
    written = {}
    for name, (*setting, seeds, shift) in CONFIGS.items():
        effect = rng.normal(shift, 0.01, (LAYERS, HEADS, 1))
        for seed in seeds:
            seed_effect = rng.normal(0, 0.003, (LAYERS, HEADS, 1))
            values = {
                m: base[m] + sign * (effect + seed_effect + rng.normal(0, 0.001, shape))
                for m, sign in zip(METRICS, (1, -1), strict=True)
            }
            write_eval(root / "sweep" / f"{name}-{seed}", _columns(*setting, seed), values)
            written[name, seed] = values
    return root, written


def _report(root, out_name, **options):
    out = root / out_name
    build.build_report(root / "sweep", out, METRICS, "random_haar", "", None, **options)
    return (out / "report.md").read_text(), json.loads((out / "report.json").read_text())


def _unit_means(written, name, metric, axis):
    """A configuration's per-unit values by hand: each seed's mean over `axis`, then the mean over seeds."""
    return np.mean([written[name, s][metric].mean(axis=axis) for s in CONFIGS[name][5]], axis=0).ravel()


def _pair(data, metric, a, b, setting=("key+value", 2, 2)):
    (pair,) = [
        p
        for p in data["paired"]
        if p["metric"] == metric and (p["a"], p["b"]) == (a, b) and p["setting"] == list(setting)
    ]
    return pair


def test_paired_tests_run_on_documents_unless_asked_for_layer_head_means(sweep):
    root, written = sweep
    assert _report(root, "default")[1]["unit"] == "document"  # the independent units, where rows name them
    text, data = _report(root, "layer_head", unit="layer_head")
    assert data["unit"] == "layer_head" and "Unit = (layer, KV head)" in text
    assert "not independent samples of text" in text
    haar, hadamard = "turboquant_mse · random_haar", "turboquant_mse · fast_hadamard"
    for metric in METRICS:
        d = _unit_means(written, "haar", metric, axis=2) - _unit_means(written, "hadamard", metric, axis=2)
        # labels sorted: "…fast_hadamard" is A, so B − A = haar − hadamard
        pair = _pair(data, metric, hadamard, haar)
        assert pair["n"] == LAYERS * HEADS  # units, not the 96 blocks
        assert pair["p"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-9)
        assert pair["median_diff"] == pytest.approx(np.median(d))
        columns = [_unit_means(written, n, metric, axis=2) for n in ("fitted", "hadamard", "haar")]
        assert pair["friedman_p"] == pytest.approx(stats.friedmanchisquare(*columns).pvalue, rel=1e-9)
    assert f"**output_cosine** (higher is better) on {LAYERS * HEADS} units" in text
    assert "**key_rel_mse** (lower is better)" in text


def test_seeds_are_one_configuration(sweep):
    root, written = sweep
    text, data = _report(root, "seeds")
    assert len(data["summary"]) == len(CONFIGS)  # five configurations from seven evaluations
    (haar,) = [r for r in data["summary"] if r["seeds"] == [0, 1, 2]]
    assert (haar["configuration"], haar["kv"]) == ("turboquant_mse · random_haar", "key+value")
    means = [written["haar", s]["output_cosine"].mean() for s in (0, 1, 2)]
    assert haar["output_cosine_mean"] == pytest.approx(np.mean(means))
    assert haar["output_cosine_seed_sd"] == pytest.approx(np.std(means, ddof=1))
    row = next(
        line for line in text.splitlines() if line.startswith("| turboquant_mse · random_haar | key+value")
    )
    assert (
        f"{build._fmt(np.mean(means))} ± {build._fmt(np.std(means, ddof=1), 3)} |" in row and "| 3 |" in row
    )
    one_seed = next(
        line for line in text.splitlines() if line.startswith("| turboquant_mse · fast_hadamard |")
    )
    assert "± —†" in one_seed and "† One seed gives no seed-to-seed variance" in text


def test_document_unit_averages_each_document(sweep):
    root, written = sweep
    text, data = _report(root, "document", unit="document")
    titles = list(dict.fromkeys(DOCUMENTS))

    def document_means(name):
        per_window = np.mean(
            [written[name, s]["output_cosine"].mean(axis=(0, 1)) for s in CONFIGS[name][5]], axis=0
        )
        return np.array([per_window[[d == t for d in DOCUMENTS]].mean() for t in titles])

    pair = _pair(data, "output_cosine", "turboquant_mse · fast_hadamard", "turboquant_mse · random_haar")
    d = document_means("haar") - document_means("hadamard")
    assert pair["unit"] == "document" and pair["n"] == len(titles) == 6  # "NaN" and "1984" stay titles
    assert pair["p"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-9)
    assert "Unit = source document" in text


def test_document_unit_needs_a_document_column(tmp_path):
    values = {m: np.full((LAYERS, HEADS, WINDOWS), 0.5) for m in METRICS}
    write_eval(tmp_path / "sweep" / "old", _columns(*CONFIGS["haar"][:5], 0), values, document=False)
    with pytest.raises(ReportError, match=r"unit=document needs .*document.* use the other unit"):
        build.build_report(tmp_path / "sweep", tmp_path / "out", METRICS, unit="document")
    with pytest.raises(ReportError, match="choose one of"):
        build.build_report(tmp_path / "sweep", tmp_path / "out", METRICS, unit="window")


def test_a_repeated_seed_is_refused(tmp_path):
    values = {m: np.full((LAYERS, HEADS, WINDOWS), 0.5) for m in METRICS}
    for job in ("a", "b"):
        write_eval(tmp_path / "sweep" / job, _columns(*CONFIGS["haar"][:5], 0), values)
    with pytest.raises(ReportError, match="more than once with the same seed"):
        build.build_report(tmp_path / "sweep", tmp_path / "out", METRICS)


def test_tables_say_what_they_show(sweep):
    text, _ = _report(sweep[0], "labels")
    assert "output_cosine: mean ± seed SD" in text and "median B − A (over units)" in text
    assert "### kv = key: K 2.5 bits, V exact" in text and "### kv = key+value: K 2 bits, V 2 bits" in text
    assert "None" not in text and "2.5000" not in text
    k_bits = {line.split(" | ")[2] for line in text.splitlines() if line.startswith("| turboquant_mse")}
    assert {"2", "2.5"} <= k_bits
    assert "Friedman p = — (Friedman needs ≥ 3 configurations; this setting has 2)" in text
    assert re.search(r"Friedman p = \d", text)  # the three-configuration setting has one


def test_one_colour_per_configuration_in_every_figure(sweep, monkeypatch):
    seen, save = {}, build._save

    def recording_save(fig, path):
        for artist in fig.findobj(lambda a: a.get_gid() is not None):
            c = artist.get_facecolor() if isinstance(artist, PathCollection) else artist.get_color()
            seen.setdefault(path.stem, set()).add(
                (artist.get_gid(), to_hex(c if isinstance(c, str) else c[0]))
            )
        return save(fig, path)

    monkeypatch.setattr(build, "_save", recording_save)
    _, data = _report(sweep[0], "colours")
    colours = data["colours"]
    assert len(set(colours.values())) == len(colours) == 3  # one label, one colour, at both settings
    assert set(seen) == {
        "pareto_output_cosine",
        "per_layer_output_cosine",
        "by_bits_output_cosine",
        "vs_random_haar_output_cosine",
    }
    for figure in seen.values():
        assert figure <= set(colours.items())  # every artist of a configuration has the one colour
    assert {label for label, _ in seen["pareto_output_cosine"]} == set(colours)


def test_labels_from_k_and_v_rotations_and_from_old_results():
    def label(**columns):
        return Evaluation(None, {"columns": {"codec": "turboquant_mse", **columns}}, []).label

    both = {"k_bits": 2, "v_bits": 2}
    assert (
        label(**both, k_rotation="fast_hadamard", v_rotation="fast_hadamard")
        == "turboquant_mse · fast_hadamard"
    )
    assert label(k_bits=2, v_bits=None, k_rotation="fast_hadamard", v_rotation=None) == (
        "turboquant_mse · fast_hadamard"
    )
    assert label(**both, k_rotation=FITTED, v_rotation="random_haar", rotations_from="out/train/run7") == (
        f"turboquant_mse · K {FITTED} / V random_haar (run7)"
    )
    assert label(**both, rotation="identity") == "turboquant_mse · identity"  # before k_/v_rotation
    assert (
        label(**both, rotation="block_so8_static", view="pair") == "turboquant_mse · block_so8_static[pair]"
    )
    # per-head statistics and the cache's layout are part of what was built, so of the label
    hadamard = {**both, "k_rotation": "fast_hadamard", "v_rotation": "fast_hadamard"}
    options = '{"center": true, "key_metric": "query"}'
    assert label(**hadamard, options=options, exact_layers="[0]", sink_tokens=4, recent_window=32) == (
        "turboquant_mse centered query-metric keys · fast_hadamard +exact layers [0] +4 sinks +32 recent"
    )
    # decoding options too: configurations differing only in them must not collide
    for option, name in (("norm_correction", "norm-corrected"), ("unbiased", "unbiased decode")):
        assert label(**hadamard, options=f'{{"{option}": true}}') == f"turboquant_mse {name} · fast_hadamard"


def test_pareto_front_is_the_set_of_non_dominated_points_found_by_brute_force():
    import random

    from tqlab.report.build import _pareto

    rng = random.Random(0)
    for higher_better in (True, False):
        for _ in range(50):
            points = [(rng.randint(1, 6), rng.randint(0, 9)) for _ in range(rng.randint(1, 12))]
            sign = 1 if higher_better else -1

            def dominated(p, points=points, sign=sign):
                return any(q[0] <= p[0] and sign * q[1] >= sign * p[1] and q != p for q in points)

            brute = sorted({p for p in points if not dominated(p)})
            assert sorted(set(_pareto(points, higher_better))) == brute


def test_a_configuration_is_drawn_against_the_reference_that_differs_only_in_its_rotation(tmp_path):
    from tqlab.report.collect import collect, group_seeds

    values = {m: np.full((LAYERS, HEADS, WINDOWS), 0.9) for m in METRICS}
    for center in (False, True):
        for rotation in ("random_haar", "fast_hadamard"):
            options = json.dumps({"center": center})
            columns = _columns("key+value", 2, 2, rotation, rotation, 0, options=options)
            write_eval(tmp_path / "sweep" / f"{rotation}-{center}", columns, values)
    configs = group_seeds(collect(tmp_path / "sweep")[0])
    for conf in configs:
        ref = build.reference_for(conf, configs, "random_haar")
        if conf.evals[0].columns["k_rotation"] == "random_haar":
            assert ref is None  # the reference is not drawn against itself, centered or not
        else:
            assert ref.evals[0].columns["options"] == conf.evals[0].columns["options"]  # same centering


def test_fits_of_other_settings_are_other_configurations_with_their_own_labels(tmp_path):
    from tqlab.report.collect import collect, group_seeds

    values = {m: np.full((LAYERS, HEADS, WINDOWS), 0.9) for m in METRICS}
    for i, (config, seed) in enumerate([("aaaaaa11", 0), ("aaaaaa11", 1), ("bbbbbb22", 0)]):
        columns = _columns("key+value", 2, 2, FITTED, FITTED, 0, fit="mse", fit_seed=seed, fit_config=config)
        write_eval(tmp_path / "sweep" / str(i), columns, values)
    configs = group_seeds(collect(tmp_path / "sweep")[0])
    assert sorted(len(c.evals) for c in configs) == [1, 2]  # two seeds of one fit, and another fit
    assert len({c.label for c in configs}) == 2


def test_holm_leaves_an_undefined_p_out_of_its_family():
    from tqlab.report.stats import holm, paired_difference

    adjusted = holm([float("nan"), 0.01, 0.02])
    assert math.isnan(adjusted[0]) and adjusted[1:] == pytest.approx([0.02, 0.02])  # a family of two
    # a unit infinite in both configurations has no difference: left out, not a NaN p, and without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert paired_difference([0, float("inf"), 0, 0], [1, float("inf"), 2, 3])["n"] == 3


def test_blocks_not_in_every_configuration_are_said_and_protocols_are_told_apart(tmp_path):
    rng = np.random.default_rng(1)
    shape = (LAYERS, HEADS, WINDOWS)
    for name, rotation, protocol in (
        ("a", "random_haar", "all_quantized"),
        ("b", "fast_hadamard", "all_quantized"),
        ("c", "fast_hadamard", "prefill_exact"),
    ):
        values = {m: rng.normal(0.9, 0.03, shape) for m in METRICS}
        columns = _columns("key+value", 2, 2, rotation, rotation, 0, protocol=protocol)
        write_eval(tmp_path / "sweep" / name, columns, values)
    rows = (tmp_path / "sweep" / "c" / "results.csv").read_text().splitlines()
    (tmp_path / "sweep" / "c" / "results.csv").write_text(
        "\n".join(rows[: 1 + LAYERS * HEADS * WINDOWS // 2])
    )
    text, data = _report(tmp_path, "out")
    labels = {row["configuration"] for row in data["summary"]}
    assert "turboquant_mse · fast_hadamard +prefill exact" in labels and len(labels) == 3
    left = {(la, h, w) for la, h, w in np.ndindex(LAYERS, HEADS, WINDOWS)} - {
        tuple(int(x) for x in row.split(",")[13:16]) for row in rows[1 : 1 + LAYERS * HEADS * WINDOWS // 2]
    }
    assert f"{len(left)} block(s) are not in every configuration of this setting" in text
