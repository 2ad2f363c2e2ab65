"""Tables, raw JSON and plots for the benchmark studies (every figure of a study from one run)."""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Callable, List, Sequence, Tuple

import torch

from megams.training.mfu import _cpu_model

Column = Tuple[str, Callable[[dict], object]]  # (header, row -> value)

MiB = 1024 ** 2


def machine() -> dict:
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A Markdown table (what the docs get, and what the study prints)."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join(" --- " for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(get(r)) for _, get in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_outputs(out_dir: str, name: str, payload: dict, text: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text + "\n")


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height))
    return fig, (axes if ncols > 1 else [axes])


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def relabel(rows: List[dict], key: str = "label") -> List[str]:
    return [r[key] for r in rows]
