"""Per-epoch metrics of a run: ``metrics.csv``, ``metrics.json`` and a ``metrics.png`` plot."""
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, List

from .checkpoint import atomic_write

__all__ = ['MetricsLog', 'plot_metrics']

_logger = logging.getLogger(__name__)


class MetricsLog:
    """Rows of per-epoch metrics, rewritten atomically after each :meth:`append`."""

    def __init__(self, folder: Path, rows: List[Dict[str, Any]] = ()):
        self.folder = Path(folder)
        self.rows = rows if isinstance(rows, list) else list(rows)

    def append(self, row: Dict[str, Any]) -> None:
        self.rows.append(dict(row))
        self.write()

    def write(self) -> None:
        if not self.rows:
            return
        fields = list(dict.fromkeys(k for row in self.rows for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        _write_text(self.folder / 'metrics.csv', buf.getvalue())
        _write_text(self.folder / 'metrics.json', json.dumps(self.rows, indent=1))
        plot_metrics(self.rows, self.folder / 'metrics.png')


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def plot_metrics(rows: List[Dict[str, Any]], path: Path) -> bool:
    """Loss and accuracy curves as a PNG (needs matplotlib; returns False without it)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        _logger.warning('matplotlib is not installed: no metrics plot (pip install matplotlib).')
        return False
    epochs = [r['epoch'] for r in rows]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label in (('train_loss', 'train'), ('val_loss', 'val'), ('ema_val_loss', 'val (EMA)')):
        _plot(loss_ax, rows, epochs, key, label)
    for key, label in (('val_top1', 'val top-1'), ('val_top5', 'val top-5'), ('ema_val_top1', 'val top-1 (EMA)')):
        _plot(acc_ax, rows, epochs, key, label)
    loss_ax.set(xlabel='epoch', ylabel='loss', title='loss')
    acc_ax.set(xlabel='epoch', ylabel='accuracy (%)', title='validation accuracy')
    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100))
    return True


def _plot(ax, rows, epochs, key, label) -> None:
    points = [(e, r[key]) for e, r in zip(epochs, rows) if r.get(key) is not None]
    if points:
        ax.plot(*zip(*points), marker='o', label=label)
