"""Per-step metrics: ``metrics.jsonl`` (one JSON object per logged step) and the ``loss.png`` plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


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


def read_metrics(path: Path) -> list[dict]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
