"""The figures drawn from docs/benchmarks.md read its tables as written."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, monkeypatch):
    """A plot script imported as `python benchmarks/<name>.py` runs it: its folder first on the path."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_plot_reads_every_row_and_its_ratio(monkeypatch):
    """Each speed-up the plot draws is SDPA's µs over the codes' µs, which the table rounds into its own column."""
    plot = _script("plot_gpu_decode", monkeypatch)
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    table = text.split("<!-- gpu_decode:begin -->")[1].split("<!-- gpu_decode:end -->")[0]
    printed = re.findall(
        r"^\| \d+ \| \d+/\d+ \| \d+k \| K\dV\d \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)×", table, re.M
    )
    drawn = plot.rows(text)
    assert len(drawn) == len(printed) > 0
    for row, (sdpa, codes, ratio) in zip(drawn, printed, strict=True):
        # the µs are rounded to 0.05 either way and the ratio to 0.005
        slack = row["speedup"] * (0.05 / float(sdpa) + 0.05 / float(codes)) + 0.005
        assert row["speedup"] == pytest.approx(float(ratio), abs=slack)


def test_decode_plot_writes_a_figure(tmp_path, monkeypatch):
    plot = _script("plot_gpu_decode", monkeypatch)
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        "<!-- gpu_decode:begin -->\n| batch | q/KV heads | context | bits | SDPA bf16 µs | Triton codes µs |\n"
        "| 1 | 12/2 | 4k | K4V4 | 10.0 | 5.0 |\n| 1 | 12/2 | 64k | K4V4 | 30.0 | 10.0 |\n<!-- gpu_decode:end -->\n"
    )
    assert [(r["context"], r["speedup"]) for r in plot.rows(docs.read_text())] == [(4096, 2.0), (65536, 3.0)]
    out = tmp_path / "decode.png"
    argv, sys.argv = sys.argv, ["plot_gpu_decode.py", "--docs", str(docs), "--out", str(out)]
    try:
        plot.main()
    finally:
        sys.argv = argv
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_plot_names_a_missing_table(monkeypatch):
    with pytest.raises(SystemExit, match="no decode table"):
        _script("plot_gpu_decode", monkeypatch).rows("no table here")
