"""Write one script's section of a Markdown file in place, between its begin/end markers, and read a
section's table back."""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path


def write_section(path: Path, key: str, body: str) -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote the {key} section of {path}")


def table_cells(text: str, key: str, missing: str) -> list[list[str]]:
    """The cells of every table row (header and separator too) between `key`'s markers in `text`; exits with
    `missing` where there is no such section."""
    body = re.search(
        re.escape(f"<!-- {key}:begin -->") + "(.*?)" + re.escape(f"<!-- {key}:end -->"), text, re.S
    )
    if body is None:
        raise SystemExit(missing)
    lines = body.group(1).splitlines()
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]


def write_gpu_section(
    out: Path, key: str, title: str, note: str, rows: list[str], versions: str = ""
) -> None:
    """A GPU benchmark's section: its title, the command that ran with date, GPU, torch and triton (and
    `versions`), `note`, then its table rows; written into `out` unless it is '-'."""
    import torch
    import triton

    body = "\n".join(
        [
            f"## {title}",
            "",
            f"`python {' '.join(sys.argv)}` — {datetime.date.today()}, {torch.cuda.get_device_name(0)}, "
            f"torch {torch.__version__}, triton {triton.__version__}{versions}. {note}",
            "",
            *rows,
        ]
    )
    if str(out) != "-":
        write_section(out, key, body)
