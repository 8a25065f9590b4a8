"""Per-step metrics: ``metrics.jsonl`` (one JSON object per logged step) and the ``loss.png`` plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import UserError


class MetricsLog:
    """Appends one JSON line per record to ``path`` and flushes it, so a killed run keeps its log."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = Path(path)
        self._file = open(self.path, "a" if append else "w")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        """Write one record (non-finite floats become null)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsError(UserError):
    """A ``metrics.jsonl`` line that is not a JSON record."""


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl``.

    A last line without its newline that does not parse (a write cut short) is left out.

    Raises:
        MetricsError: any other line is not a JSON object (named by ``file:line``).
    """
    text = Path(path).read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn last line
            raise MetricsError(f"{path}:{number}: not a JSON record: {line[:60]!r}") from None
        if not isinstance(record, dict):
            raise MetricsError(f"{path}:{number}: not a JSON object: {line[:60]!r}")
        records.append(record)
    return records


def plot_loss(metrics_path: Path, out_png: Path) -> Path:
    """Plot training loss (and eval loss where logged) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [
        (r["step"], r["loss"]) for r in records if r.get("kind") == "train" and r.get("loss") is not None
    ]
    evals = [
        (r["step"], r["eval_loss"])
        for r in records
        if r.get("kind") == "eval" and r.get("eval_loss") is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss (token-normalized)")
    if evals:
        ax.plot(*zip(*evals), "o--", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
