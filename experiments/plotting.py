"""The figures' shared matplotlib set-up: a headless backend, LM-slot axes, chance lines, saving.

Kept free of the experiments' flags (no import of experiments.common) so that binaries with
flags of their own, such as show_datasets, can use it too.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # the binaries run on servers and in tests, without a display
import matplotlib.pyplot as plt  # noqa: E402

CHANCE = 1 / 3  # three entities, one of them the answer
SLOT_AXIS_LABEL = "slot (LM input, then output of layer i)"


def slot_names(n_slots: int) -> list[str]:
    """Tick labels of the residual slots: the LM input ("emb"), then each layer's output."""
    return ["emb"] + [str(i) for i in range(n_slots - 1)]


MAX_SLOT_LABELS = 12  # about what a 3.6-inch panel holds at fontsize 7 without overlap


def slot_axis(ax: plt.Axes, n_slots: int, label: str = SLOT_AXIS_LABEL) -> None:
    """Slot ticks on the x axis: a minor tick per slot, labels on at most MAX_SLOT_LABELS of them
    (every k-th from "emb", and the last slot), so 28-40-layer models stay legible."""
    names = slot_names(n_slots)
    step = max(1, math.ceil(n_slots / MAX_SLOT_LABELS))
    ticks = list(range(0, n_slots, step))
    if ticks[-1] != n_slots - 1:
        if n_slots - 1 - ticks[-1] < step / 2 and len(ticks) > 1:
            ticks.pop()  # too close to the last slot's label
        ticks.append(n_slots - 1)
    ax.set_xticks(ticks, [names[t] for t in ticks], fontsize=7)
    ax.set_xticks(range(n_slots), minor=True)
    ax.set_xlabel(label)


def chance_line(ax: plt.Axes, label: str | None = None) -> None:
    ax.axhline(CHANCE, color="gray", ls="--", lw=1, label=label)


def save(fig: plt.Figure, path: str, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
