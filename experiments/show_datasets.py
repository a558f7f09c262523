"""Saves one picture per dataset: an item's image with its token regions drawn over it.

    python -m experiments.show_datasets --geometry qwen2_vl --output_dir outputs/datasets \
        [--whatsup_dir DIR/controlled_images] [--coco_dir DIR]

Object tokens are outlined in their slot's colour, strips are tinted in it, background tokens
carry a grey dot, and the token grid is drawn; the title holds the prompt and the answer.
--coco_dir holds coco_qa_two_obj.json, val2017/%012d.jpg and optionally
annotations/instances_val2017.json (for boxes).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from absl import flags
from matplotlib.patches import Rectangle
from PIL import Image

from experiments import plotting
from experiments.plotting import plt
from spatial_jax import program
from spatial_jax.data.coco import load_coco_spatial
from spatial_jax.data.geometry import GEOMETRIES, Geometry, get_geometry
from spatial_jax.data.regions import Regions, box_regions
from spatial_jax.data.synthetic import TASKS, generate
from spatial_jax.data.whatsup import whatsup_items

FLAGS = flags.FLAGS
flags.DEFINE_enum("geometry", "qwen2_vl", sorted(GEOMETRIES), "Model geometry to lay the datasets out for.")
flags.DEFINE_string("output_dir", None, "Folder for the PNGs.", required=True)
flags.DEFINE_string("whatsup_dir", None, "What'sUp controlled_images folder (optional).")
flags.DEFINE_string("coco_dir", None, "COCO-spatial folder (optional; see the module docstring).")
flags.DEFINE_integer("index", 0, "Which item of each dataset to show.")

SLOT_COLOURS = ("tab:orange", "tab:purple", "tab:cyan")


def draw_regions(ax: plt.Axes, image: Image.Image, regions: Regions, title: str, show_strips: bool = True) -> None:
    """Image with the token grid, object tokens (outlined), strips (tinted) and background (dots)."""
    width, height = image.size
    n_rows, n_cols = regions.grid
    cell_w, cell_h = width / n_cols, height / n_rows
    ax.imshow(np.asarray(image), extent=(0, width, height, 0))

    def cell(index: int) -> tuple[float, float]:
        return (index % n_cols) * cell_w, (index // n_cols) * cell_h

    for slot, colour in enumerate(SLOT_COLOURS[:len(regions.objects)]):
        if show_strips:
            for index in regions.strips[slot]:
                ax.add_patch(Rectangle(cell(index), cell_w, cell_h, facecolor=colour, alpha=0.18, linewidth=0))
        for index in regions.objects[slot]:
            ax.add_patch(Rectangle(cell(index), cell_w, cell_h, fill=False, edgecolor=colour, linewidth=2.0))
        ax.plot([], [], color=colour, linewidth=3, label=f"slot {slot} object" + (" / strip" if show_strips else ""))
    centres = np.array([cell(int(i)) for i in regions.background]) + (cell_w / 2, cell_h / 2)
    ax.scatter(centres[:, 0], centres[:, 1], s=4, color="0.45", label="background")
    for c in range(n_cols + 1):
        ax.axvline(c * cell_w, color="0.6", linewidth=0.4)
    for r in range(n_rows + 1):
        ax.axhline(r * cell_h, color="0.6", linewidth=0.4)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title("\n".join(textwrap.wrap(title, 48)), fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)


def save(figure: plt.Figure, path: Path) -> None:
    plotting.save(figure, str(path), dpi=110)
    print(f"wrote {path}")


def show_synthetic(geometry: Geometry, out: Path, index: int) -> None:
    for task in TASKS:
        items = generate(task, geometry)
        horizontal = [i for i in items if i.horizontal]
        vertical = [i for i in items if not i.horizontal]
        figure, axes = plt.subplots(1, 2, figsize=(11, 4.8))
        for ax, item in zip(axes, (horizontal[index], vertical[index])):
            draw_regions(ax, item.image, item.regions, f"{item.prompt}-> {item.answer}  [{', '.join(item.entities)}]")
        figure.suptitle(f"{task} on {geometry.name}: {len(items)} items, {geometry.n_tokens}x{geometry.n_tokens} "
                        f"tokens of {geometry.token_px} px, strips {geometry.strip_widths()}", fontsize=10)
        save(figure, out / f"{task}_{geometry.name}.png")


def show_whatsup(geometry: Geometry, folder: str, out: Path, index: int) -> None:
    items = whatsup_items(folder, geometry)
    item = items[index]
    figure, ax = plt.subplots(figsize=(6.5, 5))
    draw_regions(ax, item.image, item.regions, f"{item.prompt}-> {item.answer}  ({len(items)} items)")
    save(figure, out / f"whatsup_{geometry.name}.png")


def show_coco(geometry: Geometry, folder: str, out: Path, index: int) -> None:
    root = Path(folder)
    instances = root / "annotations" / "instances_val2017.json"
    items = load_coco_spatial(root / "coco_qa_two_obj.json", root / "val2017",
                              instances if instances.is_file() else None)
    item = items[index]
    image = item.image
    grid = geometry.token_grid(image.size)
    boxes = [b for b in (item.subject_box, item.object_box) if b is not None]
    figure, ax = plt.subplots(figsize=(7, 5))
    title = f"{item.prompt(geometry.name, 'lr')} -> {item.relation}  ({len(items)} items; boxes: subject, object)"
    if boxes:
        draw_regions(ax, image, box_regions(boxes, image.size, grid), title, show_strips=False)
    else:
        ax.imshow(np.asarray(image))
        ax.set_title("\n".join(textwrap.wrap(title + " [no boxes]", 48)), fontsize=9)
    save(figure, out / f"coco_{geometry.name}.png")


def main(argv: list[str]) -> None:
    del argv
    geometry = get_geometry(FLAGS.geometry)
    out = Path(FLAGS.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    show_synthetic(geometry, out, FLAGS.index)
    if FLAGS.whatsup_dir:
        show_whatsup(geometry, FLAGS.whatsup_dir, out, FLAGS.index)
    if FLAGS.coco_dir:
        show_coco(geometry, FLAGS.coco_dir, out, FLAGS.index)


if __name__ == "__main__":
    program.run(main, wrote=lambda: FLAGS.output_dir)
