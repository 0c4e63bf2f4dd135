"""train(cfg) and evaluate(cfg) end to end, resumption, locking, W&B offline files, a multirun."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tqlab import tasks
from tqlab.config import ConfigError
from tqlab.fit import module as fit_module
from tqlab.rotation.io import load_rotations
from tqlab.runs import RunLocked, claim
from tqlab.tasks import common
from wandb_records import wandb_records

ROOT = Path(__file__).parents[1]
train_task = importlib.import_module(
    "tqlab.tasks.train"
)  # the module, which tqlab.tasks.train (a function) hides
SYNTHETIC = [
    "data=synthetic",
    "data.seq_len=32",
    "data.sequences={train:4,validation:2,test:2}",
    "logger=none",
    "progress=false",
]


def cfg(name, tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose(config_name=name, overrides=[*SYNTHETIC, *overrides])
    c.results_root, c.output_dir = str(tmp_path / "runs"), str(tmp_path / "out")
    return c


def test_train_then_evaluate_the_fitted_rotations(tmp_path):  # one rotation per layer
    results = tasks.train(
        cfg("train", tmp_path, "fit.max_epochs=2", "rotation=triality", "kv=full_kv", "fit.per_head=false")
    ).folder
    done = json.loads((results / "done.json").read_text())
    assert done["epochs_done"] == 2 and done["best_val_loss"] <= done["val_loss_initial"] * 1.05
    rotations, facts = load_rotations(results / "best.safetensors")
    assert sorted(rotations) == ["key_layer0", "key_layer1", "value_layer0", "value_layer1"]
    assert facts["rotation_options"]["view"] == "spinor_plus"
    m = rotations["key_layer1"].matrix().double()
    torch.testing.assert_close(m @ m.T, torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)

    out = tasks.evaluate(cfg("eval", tmp_path, f"rotations={results}", "kv=full_kv", "bits=2")).folder
    summary = json.loads((out / "summary.json").read_text())
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 2  # header + layers × KV heads × test sequences
    assert (
        summary["columns"]["k_rotation"]
        == summary["columns"]["v_rotation"]
        == "fitted:fast_hadamard+block_so8_learned"
    )
    assert summary["columns"]["view"] == "spinor_plus"
    assert 0 < summary["overall"]["output_cosine"] <= 1
    assert summary["overall"]["kv_bits_per_coordinate"] == pytest.approx(2 + 16 / 64)


def test_fractional_bits_and_baselines_evaluate_with_honest_bits(tmp_path):
    mixed = json.loads(
        (tasks.evaluate(cfg("eval", tmp_path, "bits=2.5")).folder / "summary.json").read_text()
    )
    assert mixed["overall"]["key_bits_per_coordinate"] == pytest.approx(2.5 + 2 * 16 / 64)
    q4 = json.loads(
        (
            tasks.evaluate(
                cfg("eval", tmp_path, "codec=int4_block", "bits=4", "rotation=fast_hadamard")
            ).folder
            / "summary.json"
        ).read_text()
    )
    assert q4["overall"]["key_bits_per_coordinate"] == 4.5
    assert q4["overall"]["value_bits_per_coordinate"] == 16


def test_finished_runs_are_skipped_and_interrupted_training_resumes(tmp_path, monkeypatch):
    c = cfg("eval", tmp_path, "bits=3")
    first = tasks.evaluate(c).folder
    monkeypatch.setattr(
        common, "kv_source", lambda cfg: pytest.fail("a finished evaluation must not recompute")
    )
    assert tasks.evaluate(c).folder == first
    monkeypatch.undo()

    original, calls = fit_module.SaveRotations.on_validation_end, []

    def interrupt_after_first_epoch(self, trainer, module):
        original(self, trainer, module)
        if not trainer.sanity_checking and not calls:
            calls.append(1)
            raise KeyboardInterrupt

    monkeypatch.setattr(fit_module.SaveRotations, "on_validation_end", interrupt_after_first_epoch)
    t = cfg("train", tmp_path, "fit.max_epochs=3", "fit.patience=10")
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning turns Ctrl-C into SystemExit(1)
        tasks.train(t)
    results = Path(t.results_root) / "train"
    (folder,) = results.iterdir()
    assert json.loads((folder / "fit_state.json").read_text())["epochs_done"] == 1
    assert not (folder / "done.json").exists()
    # resume=<folder> continues that run with its own saved configuration, whatever else is passed
    tasks.train(cfg("train", tmp_path, f"resume={folder}", "fit.max_epochs=99"))
    assert json.loads((folder / "done.json").read_text())["epochs_done"] == 3
    assert len(list(results.iterdir())) == 1


def test_two_processes_never_write_one_folder(tmp_path):
    with claim(tmp_path / "run"):
        with pytest.raises(RunLocked, match="another process"):
            with claim(tmp_path / "run"):
                pass
    # a lock file left by a dead owner, or cut short, holds nothing: the OS lock died with its process
    for leftover in (json.dumps({"pid": 2**22 + 12345, "host": "x"}), "", '{"pid": 12'):
        (tmp_path / "run" / "lock").write_text(leftover)
        with claim(tmp_path / "run"):
            pass


def _race(folder, barrier, wins):
    try:
        with claim(folder):
            barrier.wait(timeout=60)  # hold the lock until every process has tried
            wins.put(1)
    except RunLocked:
        barrier.wait(timeout=60)


def test_exactly_one_of_eight_processes_claims_a_folder_with_a_stale_lock(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for trial in range(5):
        folder = tmp_path / f"run{trial}"
        folder.mkdir()
        (folder / "lock").write_text(json.dumps({"pid": 2**22 + 1, "host": "gone"}))  # a dead owner
        barrier, wins = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(folder, barrier, wins)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs)
        assert sum(wins.get(timeout=5) for _ in range(wins.qsize())) == 1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["codec=int4_block", "bits=3"], r"bits=3 is not allowed for codec=int4_block: choose from \[4\]"),
        (
            ["codec=kivi", "bits=2", "rotation=random_haar"],
            "rotation=random_haar does not apply to codec=kivi",
        ),
        (["rotation=block_so8_learned", "bits=2.5"], "fitted at integer bits"),
        (["rotation=fast_hadamard", "data.head_dim=48"], "power-of-two head_dim"),
        (["bits=9"], r"bits=9 is not allowed for codec=turboquant_mse: choose from 1..8"),
        (["bits=2.3"], "fraction must be a multiple of 0.125"),  # 2.3 would run at 2.25 under its label
        (["rotation.name=haar"], r"'haar' is not a rotation; choose from \['block_so8_learned'"),
        (["kv.compress=[keys]"], "kv.compress"),
        (["v_bits=2"], r"v_bits=2 is set but kv.compress=\['key'\] keeps the values exact"),
        (["eval.top_k=0"], "eval.top_k=0 must be an integer >= 1"),
        (["codec.norm_dtype=float64"], r"codec.norm_dtype='float64' is not allowed; use \['float16'"),
        (["+codec.foo=1"], r"codec takes no option\(s\) \['foo'\]"),
        (["seed=abc"], "seed='abc' must be an integer"),
        (["store.layers=[]"], r"store.layers=\[\] must be null \(every layer\) or a non-empty list"),
        (["seed=-1"], r"seed=-1 must be an integer in 0..2\^32 − 1"),
        (
            ["kv=key_only", "k_codec=int8_block", "k_bits=8", "codec.center=true"],
            "codec.center=True belongs to codec=turboquant_mse, which no compressed side uses",
        ),
        (["kv=value_only", "codec.key_metric=query"], "codec.key_metric=query weights the keys' errors"),
        (["task=niah", "data=wiki", "niah.contexts=[]"], r"niah.contexts=\[\] must hold at least one value"),
        (["model.device=gpu"], "model.device='gpu' is not allowed; choose cpu, mps, cuda or cuda:<index>"),
        (["data.num_kv_heads=3"], "data.num_heads=4 must be a multiple of data.num_kv_heads=3"),
        (["data.kind=bogus"], r"data.kind='bogus' is not allowed; choose from \['isotropic', 'outliers'\]"),
        (["data.head_dim=0"], "data.head_dim=0 must be an integer >= 8"),
        (["data.n_outliers=100"], "data.n_outliers=100 exceeds data.head_dim=64"),
        (["task=qa"], r"task='qa' is not allowed; choose from \['eval', 'perplexity', 'niah', 'generate'\]"),
        (["task=perplexity"], "task=perplexity runs the model on text: pick data=wiki"),
        (["task=perplexity", "data=wiki", "cache.protocol=exact"], r"cache.protocol='exact' is not allowed"),
        (["task=niah", "data=wiki", "cache.sink_tokens=-1"], r"cache.sink_tokens=-1 must be an integer >= 0"),
        (
            ["task=generate", "data=wiki", "cache.exact_layers=[first]"],
            r"cache.exact_layers=\['first'\] must be",
        ),
        (["task=perplexity", "data=wiki", "perplexity.stride=999"], "must not exceed perplexity.context=256"),
        (
            [
                "task=perplexity",
                "data=wiki",
                "data.windows_per_document=2",
                "cache.protocol=prefill_exact",
                "perplexity.prefill=200",
            ],  # fmt: skip
            r"perplexity.prefill=200 under cache.protocol=prefill_exact must not exceed .* = 128",
        ),
        (["cache.recent_window=8"], "task=eval replays captured blocks and keeps only cache.sink_tokens"),
        (["codec=transform_coding", "rotation=identity", "bits=2.01"], "whole number of bits"),
        (["codec=transform_coding", "rotation=fast_hadamard"], "does not apply to codec=transform_coding"),
        (["codec.name=turboquant_mse", "rotation=eigen_hadamard", "bits=2.5"], "does not keep whole"),
        (["rotation=eigen_hadamard", "rotation.basis=values"], r"rotation.basis='values' is not allowed"),
        (
            ["kv=key_only", "k_codec=int8_block", "k_bits=8", "rotation=fast_hadamard"],
            "rotation=fast_hadamard .* is used by no compressed side",
        ),
        (["codec=relevance_gated", "bits=3", "codec.high_bits=2"], "codec.high_bits=2 must exceed bits=3"),
        (["data=wiki", "data.windows_per_document=0"], "data.windows_per_document=0 must be an integer >= 1"),
    ],
)
def test_bad_overrides_fail_before_any_compute(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(common, "kv_source", lambda cfg: pytest.fail("validation must come first"))
    with pytest.raises(ConfigError, match=message):
        tasks.evaluate(cfg("eval", tmp_path, *overrides))


def test_train_refuses_a_codec_per_side_whose_fit_it_could_not_record(tmp_path, monkeypatch):
    """The fitted file names one codec, and eval.py checks rotations against it: value rotations fitted for a
    2-bit Prod first stage would otherwise be evaluated under a 3-bit MSE codec."""
    monkeypatch.setattr(common, "kv_source", lambda cfg: pytest.fail("validation must come first"))
    with pytest.raises(ConfigError, match="v_codec=turboquant_prod: train.py fits rotations for one codec"):
        tasks.train(
            cfg(
                "train",
                tmp_path,
                "rotation=block_so8_learned",
                "kv=full_kv",
                "v_codec=turboquant_prod",
                "v_bits=3",
            )
        )


@pytest.mark.parametrize(
    "option", ["codec.key_metric=query", "codec.norm_correction=true", "codec.norm_dtype=float32"]
)
def test_train_refuses_codec_options_its_fit_would_not_use(tmp_path, monkeypatch, option):
    """The fit codes plain TurboQuant-MSE (around the mean under codec.center): another codec option would be
    recorded in the fit's fingerprint and change nothing."""
    monkeypatch.setattr(common, "kv_source", lambda cfg: pytest.fail("validation must come first"))
    with pytest.raises(ConfigError, match=f"{option.split('=')[0]}=.* is not used by train.py"):
        tasks.train(cfg("train", tmp_path, "rotation=block_so8_learned", option))


def test_a_negative_epoch_count_fails_before_any_compute(tmp_path):
    with pytest.raises(ConfigError, match="fit.max_epochs=-2 must be an integer >= 1"):
        tasks.train(cfg("train", tmp_path, "fit.max_epochs=-2"))
    with pytest.raises(ConfigError, match="fit.temperature=0 must be a positive number"):
        tasks.train(cfg("train", tmp_path, "fit.temperature=0"))


def test_rotations_fitted_around_the_mean_are_evaluated_around_it_only(tmp_path):
    results = tasks.train(
        cfg("train", tmp_path, "codec.center=true", "fit.max_epochs=1", "rotation=eigen_hadamard_butterfly")
    ).folder
    assert json.loads((results / "done.json").read_text())["center"] == {"key": True}
    with pytest.raises(ConfigError, match="fitted with codec.center=true on the keys; set codec.center=true"):
        tasks.evaluate(cfg("eval", tmp_path, f"rotations={results}", "kv=key_only", "bits=2"))
    # the eval.py command train.py prints evaluates them as they were fitted
    fitted = cfg(
        "train", tmp_path, "codec.center=true", "fit.max_epochs=1", "rotation=eigen_hadamard_butterfly"
    )
    printed = train_task._eval_overrides(fitted, {"model": "smollm2_135m", "data": "synthetic"}).split()
    assert "codec.center=true" in printed and "data=synthetic" in printed
    printed.remove("data=synthetic")  # given by cfg() already
    out = tasks.evaluate(cfg("eval", tmp_path, f"rotations={results}", *printed)).folder
    assert json.loads((out / "summary.json").read_text())["overall"]["output_cosine"] > 0.5


def test_the_printed_eval_command_names_the_model_and_data_a_fit_read():
    def printed(*overrides, choices):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            c = compose(config_name="train", overrides=list(overrides))
        return train_task._eval_overrides(c, choices).split()

    default = printed(choices={"model": "smollm2_135m", "data": "wiki"})
    assert default == ["kv=key_only", "bits=2"]
    qwen = printed("model=qwen2_5_coder_1_5b", choices={"model": "qwen2_5_coder_1_5b", "data": "wiki"})
    assert qwen[2:] == ["model=qwen2_5_coder_1_5b"]
    hub = printed("model=hf", "model.name_or_path=org/m", "data=text_file", "data.path=/d/t.txt", choices={})
    assert hub[2:] == ["model.name_or_path=org/m", "data=text_file", "data.path=/d/t.txt"]
    layers = printed("store.layers=[0,29]", choices={"model": "smollm2_135m", "data": "wiki"})
    assert layers[2:] == ["store.layers=[0,29]"]


def test_fixed_rotations_have_nothing_to_train(tmp_path):
    with pytest.raises(ConfigError, match="nothing to fit"):
        tasks.train(cfg("train", tmp_path, "rotation=random_haar"))


def test_a_data_aware_rotation_alone_is_saved_as_an_artefact_without_training(tmp_path):
    results = tasks.train(cfg("train", tmp_path, "rotation=eigen_hadamard", "kv=key_only")).folder
    done = json.loads((results / "done.json").read_text())
    assert done["epochs_done"] == 0 and done["best_val_loss"] == done["val_loss_initial"]
    rotations, _ = load_rotations(results / "best.safetensors")
    saved = rotations["key_layer0_head0"].eigenvectors
    torch.testing.assert_close(saved.T @ saved, torch.eye(64), atol=1e-5, rtol=0)
    assert not torch.allclose(saved, torch.eye(64))
    out = tasks.evaluate(cfg("eval", tmp_path, f"rotations={results}", "kv=key_only", "bits=2")).folder
    assert json.loads((out / "summary.json").read_text())["overall"]["output_cosine"] > 0.5


def test_wandb_offline_runs_hold_the_metrics_and_config_after_other_runs_in_the_process(
    tmp_path, monkeypatch
):
    # wandb reads WANDB_MODE once per process: a run started earlier (a report, a previous sweep job)
    # must not turn the next offline run into one that asks for an API key
    import wandb

    home = tmp_path / "home"  # nothing of the runs' may land under the home directory
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_DATA_DIR", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(common, "_USER_WANDB_DATA_DIR", None)

    wandb.init(project="tqlab", mode="offline", dir=str(tmp_path))
    wandb.finish()
    for bits in (4, 3):
        c = cfg("eval", tmp_path, "logger=wandb", f"bits={bits}")
        c.output_dir = str(tmp_path / f"out{bits}")
        out = tasks.evaluate(c).folder
        (run_file,) = (tmp_path / f"out{bits}" / "wandb").glob("offline-run-*/run-*.wandb")
        config, summary = wandb_records(run_file)
        assert config["codec"]["name"] == "turboquant_mse" and config["bits"] == bits
        expected = json.loads((out / "summary.json").read_text())["overall"]
        assert summary["output_cosine"] == pytest.approx(expected["output_cosine"])
        assert summary["kv_bits_per_coordinate"] == pytest.approx(expected["kv_bits_per_coordinate"])
    # the results tables W&B stages for upload stay in the run folders, not under the home directory
    assert not [p for p in home.rglob("*") if {"artifacts", "staging"} & set(p.parts)]


def test_a_two_by_two_multirun_writes_four_jobs_and_a_rerun_skips_them(tmp_path):
    args = [
        sys.executable,
        "eval.py",
        "-m",
        *SYNTHETIC,
        "rotation=identity,random_haar",
        "bits=2,3",
        f"results_root={tmp_path / 'runs'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").glob("*/result/summary.json"))
    assert len(summaries) == 4
    configs = {
        (s["columns"]["k_rotation"], s["columns"]["k_bits"])
        for s in (json.loads(p.read_text()) for p in summaries)
    }
    assert configs == {("identity", 2), ("identity", 3), ("random_haar", 2), ("random_haar", 3)}
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert (
        again.returncode == 0
        and again.stderr.count("already evaluated") + again.stdout.count("already evaluated") == 4
    )


def test_train_and_evaluate_on_a_real_smollm2_capture(tmp_path):
    real = [
        "data=wiki",
        "data.seq_len=64",
        "data.sequences={train:2,validation:1,test:1}",
        "store.layers=[0,29]",
        f"store.root={tmp_path / 'captures'}",
    ]
    trained = tasks.train(
        cfg("train", tmp_path, *real, "fit.max_epochs=1", "rotation=hadamard_block_so8_learned")
    ).folder
    haar = json.loads(
        (tasks.evaluate(cfg("eval", tmp_path, *real, "bits=2")).folder / "summary.json").read_text()
    )
    fitted = json.loads(
        (
            tasks.evaluate(cfg("eval", tmp_path, *real, "bits=2", f"rotations={trained}")).folder
            / "summary.json"
        ).read_text()
    )
    for summary in (haar, fitted):
        assert summary["blocks"] == 2 * 3 * 1  # layers × KV heads × test sequences
        assert summary["columns"]["model"] == "smollm2-135m"
        assert 0 < summary["overall"]["output_cosine"] <= 1 and 0 < summary["overall"]["logit_cosine"] <= 1
        assert set(summary["per_layer"]) == {"0", "29"}  # JSON keys
        assert set(summary["per_head"]) == {f"{la}.{h}" for la in (0, 29) for h in range(3)}
    assert len(list((tmp_path / "captures").iterdir())) == 1  # one capture, shared by all three runs


@pytest.fixture(scope="module")
def key_rotations(tmp_path_factory):
    """A finished train run: learned key rotations fitted at 2 bits for turboquant_mse."""
    tmp = tmp_path_factory.mktemp("fitted")
    return tasks.train(cfg("train", tmp, "fit.max_epochs=1", "rotation=hadamard_block_so8_learned")).folder


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["bits=2.5"], "were fitted at key bits=2; bits=2.5 would evaluate them at other bits"),
        (["bits=3"], "were fitted at key bits=2; bits=3"),
        (["codec=kivi", "rotation=identity", "bits=2"], "codec=kivi takes no rotation"),
        (["codec=turboquant_prod", "bits=2"], "were fitted for codec=turboquant_mse"),
        (["kv=value_only", "bits=2"], r"fitted \['key'\] rotations but kv.compress=\['value'\]"),
        (["bits=2", "store.layers=[0,5]"], r"store.layers=\[0, 5\] includes layers \[5\] that rotations="),
    ],
)
def test_fitted_rotations_under_other_settings_are_refused_before_compute(
    key_rotations, tmp_path, monkeypatch, overrides, message
):
    monkeypatch.setattr(common, "kv_source", lambda cfg: pytest.fail("validation must come first"))
    with pytest.raises(ConfigError, match=message):
        tasks.evaluate(cfg("eval", tmp_path, f"rotations={key_rotations}", *overrides))
    assert not (tmp_path / "runs").exists()  # no results folder either


def test_every_layer_is_refused_before_compute_for_rotations_fitted_on_some(tmp_path, monkeypatch):
    fitted = tasks.train(
        cfg("train", tmp_path, "fit.max_epochs=1", "rotation=block_so8_learned", "bits=2", "store.layers=[0]")
    ).folder
    monkeypatch.setattr(common, "kv_source", lambda cfg: pytest.fail("validation must come first"))
    with pytest.raises(
        ConfigError, match=r"store.layers=null evaluates all 2 layers, .* set store.layers=\[0\]"
    ):
        tasks.evaluate(cfg("eval", tmp_path, f"rotations={fitted}", "bits=2"))
    assert not (tmp_path / "runs" / "eval").exists()  # no results folder either


def test_a_side_without_fitted_rotations_is_labelled_with_the_rotation_it_used(key_rotations, tmp_path):
    out = tasks.evaluate(cfg("eval", tmp_path, f"rotations={key_rotations}", "kv=full_kv", "bits=2")).folder
    columns = json.loads((out / "summary.json").read_text())["columns"]
    assert columns["k_rotation"] == "fitted:fast_hadamard+block_so8_learned"
    assert columns["v_rotation"] == "random_haar"  # the configured rotation, said as such
    rows = (out / "results.csv").read_text().splitlines()
    assert "fitted:fast_hadamard+block_so8_learned,random_haar" in rows[1]


def test_the_results_folder_depends_on_what_changes_the_numbers_and_nothing_else(tmp_path):
    from tqlab.runs import fingerprint

    base = fingerprint(cfg("eval", tmp_path))
    for same in (
        ["eval.batch_size=1"],
        ["trainer=gpu"],
        ["model.device=cuda"],
        ["progress=true"],
        ["logger=csv"],
        ["bits=3.0"],
        ["k_bits=3"],  # the same spec said twice
        ["k_codec=turboquant_mse"],
    ):
        assert fingerprint(cfg("eval", tmp_path, *same)) == base, same
    # one run, however its sides' widths are spelled (bits that no compressed side reads included)
    for spellings in (
        [["k_bits=4", "bits=2"], ["k_bits=4"], ["bits=4"]],  # the default compresses keys only
        [["kv=value_only", "bits=4"], ["kv=value_only", "v_bits=4", "bits=2"]],
        [["kv=full_kv", "bits=4"], ["kv=full_kv", "k_bits=4", "v_bits=4", "bits=2"]],
        [["kv=full_kv", "bits=3", "k_bits=4"], ["kv=full_kv", "bits=4", "v_bits=3"]]
        + [["kv=full_kv", "bits=2", "k_bits=4", "v_bits=3"]],
    ):
        prints = {fingerprint(cfg("eval", tmp_path, *spelling)) for spelling in spellings}
        assert len(prints) == 1, spellings
    assert fingerprint(cfg("eval", tmp_path, "kv=full_kv", "bits=3", "k_bits=4")) != fingerprint(
        cfg("eval", tmp_path, "kv=full_kv", "bits=4", "k_bits=3")
    )
    train = fingerprint(
        cfg("train", tmp_path)
    )  # a fit reads captured blocks: the model's device is no setting
    assert fingerprint(cfg("train", tmp_path, "model.device=cuda")) == train
    # end to end, the device picks the kernels (Triton on CUDA), which change the numbers
    perplexity = ("task=perplexity", "data=wiki")
    assert fingerprint(cfg("eval", tmp_path, *perplexity, "model.device=cuda")) != fingerprint(
        cfg("eval", tmp_path, *perplexity)
    )
    assert fingerprint(cfg("eval", tmp_path, *perplexity, "eval.top_k=4")) == fingerprint(
        cfg("eval", tmp_path, *perplexity)
    )  # the model's own tokens are scored: no top-k
    for other in (
        ["bits=2"],
        ["eval.top_k=4"],
        ["seed=1"],
        ["rotation=fast_hadamard"],
        ["data.seq_len=64"],
        ["codec.norm_dtype=float32"],
        ["kv=full_kv"],
        ["trainer.precision=64-true"],
        ["k_bits=4"],
        ["kv=full_kv", "v_bits=2"],
    ):
        assert fingerprint(cfg("eval", tmp_path, *other)) != base, other


def test_non_finite_kv_is_refused_naming_the_block(tmp_path):
    with pytest.raises(ValueError, match=r"test sequence 0, layer 0, KV head 0: k contain NaN or Inf"):
        tasks.evaluate(cfg("eval", tmp_path, "data.outlier_scale=inf", "kv=value_only"))


def test_a_summary_counts_the_queries_a_metric_is_undefined_for(tmp_path):
    summary = json.loads((tasks.evaluate(cfg("eval", tmp_path)).folder / "summary.json").read_text())
    # a rank correlation needs 2 keys: the first query of each query head (2 per KV head) of each of the
    # 2 layers × 2 KV heads × 2 sequences has one
    assert summary["undefined"]["spearman"] == 16 and summary["undefined"]["output_cosine"] == 0


def test_the_apps_return_the_metric_a_sweeper_optimises(tmp_path):
    from tqlab.cli import run_app

    c = cfg("eval", tmp_path, "optimized_metric=output_cosine")
    value = run_app(tasks.evaluate, c)
    summary = json.loads((tasks.evaluate(c).folder / "summary.json").read_text())
    assert value == summary["overall"]["output_cosine"]
    c.optimized_metric = None
    assert run_app(tasks.evaluate, c) is None


def test_a_configuration_mistake_prints_one_line_and_exits_2(tmp_path):
    args = [
        sys.executable,
        "eval.py",
        *SYNTHETIC,
        "bits=9",
        f"results_root={tmp_path}",
        f"hydra.run.dir={tmp_path}/o",
    ]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: bits=9 is not allowed for codec=turboquant_mse: choose from 1..8, or fractional in between (e.g. 2.5)"
    ]


def test_ctrl_c_inside_lightning_reaches_the_app_as_keyboard_interrupt():
    import lightning as L

    class Interrupted(L.LightningModule):
        def test_step(self, batch, batch_idx):
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a step

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    data = torch.utils.data.DataLoader(torch.zeros(4, 1))
    with pytest.raises(KeyboardInterrupt):  # Lightning itself would sys.exit(1)
        common.run_stage(trainer, "test", Interrupted(), dataloaders=data, verbose=False)


def test_data_aware_rotations_train_per_head_and_transform_coding_keeps_sinks_exact(tmp_path):
    results = tasks.train(
        cfg("train", tmp_path, "fit.max_epochs=1", "rotation=eigen_hadamard_butterfly", "kv=key_only")
    ).folder
    rotations, facts = load_rotations(results / "best.safetensors")
    assert sorted(rotations)[:2] == ["key_layer0_head0", "key_layer0_head1"]  # per (layer, KV head)
    first = rotations["key_layer0_head0"].parts[0].eigenvectors
    assert not torch.allclose(first, torch.eye(64))  # fitted on the train split, saved with the butterfly
    evaluated = tasks.evaluate(cfg("eval", tmp_path, f"rotations={results}", "kv=key_only", "bits=2")).folder
    assert json.loads((evaluated / "summary.json").read_text())["overall"]["output_cosine"] > 0.5

    sinks = 3
    out = tasks.evaluate(
        cfg(
            "eval",
            tmp_path,
            "codec=transform_coding",
            "rotation=identity",
            "bits=1.5",
            "kv=key_only",
            f"cache.sink_tokens={sinks}",
            "codec.center=true",
        )
    ).folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["columns"]["sink_tokens"] == sinks
    tokens = 32  # data.seq_len
    coded = (1.5 * 64 + 16) / 64  # payload + an fp16 norm per vector
    expected = (sinks * 16 + (tokens - sinks) * coded) / tokens
    assert summary["overall"]["key_bits_per_coordinate"] == pytest.approx(expected)
