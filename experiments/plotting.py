"""The figures' shared matplotlib set-up: a headless backend, LM-slot axes, chance lines, saving.

Kept free of the experiments' flags (no import of experiments.common) so that binaries with
flags of their own, such as show_datasets, can use it too.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # the binaries run on servers and in tests, without a display
import matplotlib.pyplot as plt  # noqa: E402

CHANCE = 1 / 3  # three entities, one of them the answer
SLOT_AXIS_LABEL = "slot (LM input, then output of layer i)"


def slot_names(n_slots: int) -> list[str]:
    """Tick labels of the residual slots: the LM input ("emb"), then each layer's output."""
    return ["emb"] + [str(i) for i in range(n_slots - 1)]


def slot_axis(ax: plt.Axes, n_slots: int, label: str = SLOT_AXIS_LABEL) -> None:
    ax.set_xticks(range(n_slots), slot_names(n_slots), fontsize=7)
    ax.set_xlabel(label)


def chance_line(ax: plt.Axes, label: str | None = None) -> None:
    ax.axhline(CHANCE, color="gray", ls="--", lw=1, label=label)


def save(fig: plt.Figure, path: str, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
