"""Resuming train runs: a run killed with SIGKILL and run again ends bitwise as an uninterrupted one,
resume=<run> continues that very folder from any working directory, and an unreadable saved state says
what happened and what to do."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file

from tqlab import tasks
from tqlab.fit import module as fit_module
from tqlab.fit.state import StateUnreadable

ROOT = Path(__file__).parents[1]
SYNTHETIC = [
    "data=synthetic",
    "data.seq_len=32",
    "data.sequences={train:4,validation:2,test:2}",
    "progress=false",
    "fit.patience=10",
]


def train_command(root: Path) -> list[str]:
    """train.py as a user runs it; its CSV log shows which epochs each process ran."""
    paths = [f"results_root={root / 'runs'}", f"hydra.run.dir={root / 'out'}"]
    return [sys.executable, str(ROOT / "train.py"), *SYNTHETIC, "fit.max_epochs=5", "logger=csv", *paths]


def run_to_the_end(*commands: list[str]) -> None:
    """The commands at once (independent runs: the fast suite's time is mostly each one's imports)."""
    runs = [
        subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stderr[-3000:]


def the_folder(root: Path) -> Path:
    (folder,) = (root / "runs" / "train").iterdir()
    return folder


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_file(path).items()}


def same_results(a: Path, b: Path) -> None:
    """Bitwise equal rotations, training state and losses (the paths in the facts differ)."""
    for name in ("best.safetensors", "last.safetensors"):
        assert tensor_bytes(a / name) == tensor_bytes(b / name)
        facts = [json.loads(safe_open(str(f / name), "pt").metadata()["tqlab"]) for f in (a, b)]
        assert facts[0]["epoch"] == facts[1]["epoch"] and facts[0]["val_loss"] == facts[1]["val_loss"]
    # epochs, losses and early stopping; then the module's and Adam's tensors
    assert (a / "fit_state.json").read_bytes() == (b / "fit_state.json").read_bytes()
    tensors = json.loads((a / "fit_state.json").read_text())["tensors"]
    assert (a / tensors).read_bytes() == (b / tensors).read_bytes()
    done = [json.loads((f / "done.json").read_text()) for f in (a, b)]
    for key in ("epochs_done", "best_val_loss", "last_val_loss", "val_loss_initial"):
        assert done[0][key] == done[1][key], key


def test_a_run_killed_mid_fit_and_run_again_ends_bitwise_as_an_uninterrupted_one(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    with open(tmp_path / "killed.log", "w") as log:
        run = subprocess.Popen(train_command(killed), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline, done = time.monotonic() + 900, 0  # generous: a loaded machine is slow, not wrong
            while done < 2:
                assert run.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no second epoch within 15 minutes"
                time.sleep(0.1)
                states = list(killed.glob("runs/train/*/fit_state.json"))  # written atomically: never half
                done = json.loads(states[0].read_text())["epochs_done"] if states else 0
        finally:
            run.send_signal(signal.SIGKILL)  # no handler runs: the files are as the kill found them
            run.wait()
    done = json.loads((the_folder(killed) / "fit_state.json").read_text())["epochs_done"]
    assert 2 <= done < 5 and not (the_folder(killed) / "done.json").exists()

    run_to_the_end(train_command(killed), train_command(whole))
    same_results(the_folder(killed), the_folder(whole))
    # the resumed process numbered its epochs from where the killed one stopped
    resumed = max((killed / "out" / "csv").iterdir(), key=lambda v: int(v.name.split("_")[1]))
    with open(resumed / "metrics.csv") as f:
        epochs = {int(row["epoch"]) for row in csv.DictReader(f) if row["val_loss"]}
    assert epochs == set(range(done, 5))


def cfg(root: Path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        c = compose(config_name="train", overrides=[*SYNTHETIC, "logger=none", *overrides])
    c.results_root, c.output_dir = str(root / "runs"), str(root / "out")
    return c


def interrupted(c) -> Path:
    """Run c, stopped like Ctrl-C right after the first epoch's state is saved; returns its folder."""
    original = fit_module.SaveRotations.on_validation_end

    def stop_after_first_epoch(self, trainer, module):
        original(self, trainer, module)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module.SaveRotations, "on_validation_end", stop_after_first_epoch)
        with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning may turn Ctrl-C into SystemExit(1)
            tasks.train(c)
    (folder,) = (Path(c.results_root) / "train").iterdir()
    assert json.loads((folder / "fit_state.json").read_text())["epochs_done"] == 1
    return folder


def test_resume_continues_that_folder_from_any_working_directory(tmp_path, monkeypatch):
    (tmp_path / "first").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    c = cfg(tmp_path, "fit.max_epochs=2")
    c.results_root = "runs"  # relative, as conf/common/run.yaml has it
    folder = interrupted(c).resolve()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert tasks.train(cfg(tmp_path / "elsewhere", f"resume={folder}")).folder == folder
    assert json.loads((folder / "done.json").read_text())["epochs_done"] == 2
    assert not (tmp_path / "elsewhere" / "runs").exists()


def test_a_cut_short_last_safetensors_is_rewritten_from_the_state_on_resume(tmp_path):
    folder = interrupted(cfg(tmp_path / "cut", "fit.max_epochs=3"))
    (folder / "last.safetensors").write_bytes(b"")
    tasks.train(cfg(tmp_path / "cut", "fit.max_epochs=3"))
    whole = tasks.train(cfg(tmp_path / "whole", "fit.max_epochs=3")).folder
    same_results(folder, whole)


@pytest.mark.parametrize("name", ["fit_state.json", "fit_state.0001.safetensors", "best.safetensors"])
def test_an_unreadable_state_says_what_happened_and_what_to_do(tmp_path, name):
    c = cfg(tmp_path, "fit.max_epochs=3")
    folder = interrupted(c)
    content = (folder / name).read_bytes()
    (folder / name).write_bytes(content[: len(content) // 2])  # cut short, as by a crash mid-write
    with pytest.raises(StateUnreadable) as err:
        tasks.train(c)
    assert str(err.value).startswith(f"cannot resume {folder}: {name} is unreadable (")
    assert f"To fit again from scratch: rm -r {folder}, then run the train.py command" in str(err.value)
    assert (folder / name).read_bytes() == content[: len(content) // 2]  # nothing is deleted for the user
