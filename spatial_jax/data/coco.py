"""COCO-spatial: two-object questions on COCO val2017 photos (the What'sUp benchmark's COCO subset).

The QA file is a JSON list of [image_id, correct caption, distractor caption], captions like
"A photo of a dining table to the left of a refrigerator" or "A photo of a toilet below a sink".
Entries whose caption is left/right/above/below are kept (the paper's 440: 279 horizontal,
161 vertical). Each item is asked in both option orders ("lr", "rl"); an item counts as correct
only if both are (`strict_outcome`). Images are `<image_dir>/%012d.jpg`; boxes, when an instances
JSON is given, are the largest ground-truth box of the category named in the caption.

The amplification experiment (paper Table 2, official `coco_amplification/src/common.py`) maps a
box to visual tokens by any overlap (`overlap_tokens`), drops golden items whose boxes contradict
the truth (`boxes_agree`), and labels the subject's and the object's tokens by side (`side_labels`).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from spatial_jax.data.files import open_rgb, read_json
from spatial_jax.data.geometry import Box
from spatial_jax.data.prompts import AXIS_OPTIONS, coco_prompt
from spatial_jax.data.scoring import normalize

AXES = {"left": "horizontal", "right": "horizontal", "above": "vertical", "below": "vertical"}
# Outcomes of a strict item that failed, and the option orders ("listings") that failed in each:
# a failure is fixed when every failed listing answers the truth.
FAILED_ORDERS = {"fail_lr_only": ("lr",), "fail_rl_only": ("rl",), "fail_both": ("lr", "rl")}

_CAPTION = re.compile(r"^A photo of (?P<subject>.+?) "
                      r"(?:to the (?P<side>left|right) of|(?P<level>above|below)(?: of)?) (?P<object>.+?)\.?$")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)


def strip_article(phrase: str) -> str:
    return _ARTICLE.sub("", phrase.strip()).strip()


def parse_caption(caption: str) -> tuple[str, str, str] | None:
    """(subject, relation, object) of a spatial caption, articles stripped; None if not spatial."""
    match = _CAPTION.match(caption.strip())
    if match is None:
        return None
    return strip_article(match["subject"]), match["side"] or match["level"], strip_article(match["object"])


@dataclass(frozen=True)
class CocoItem:
    """One COCO-spatial question.

    Attributes:
      index: position of the entry in the QA file.
      image_id: COCO image id.
      subject, object: category phrases without articles ("dining table", "refrigerator").
      relation: the truth, "left", "right", "above" or "below" (subject relative to object).
      caption, distractor: the QA file's two captions.
      image_path: the photo, if an image folder was given.
      image_size: (width, height) from the instances file, if given.
      subject_box, object_box: (x0, y0, x1, y1) pixel boxes, if the instances file has that category.
    """

    index: int
    image_id: int
    subject: str
    object: str
    relation: str
    caption: str
    distractor: str
    image_path: Path | None = None
    image_size: tuple[int, int] | None = None
    subject_box: Box | None = None
    object_box: Box | None = None

    @property
    def axis(self) -> str:
        return AXES[self.relation]

    def prompt(self, style: str, order: str) -> str:
        """The question for `style` ("direct"/"anchor" or a model family) in option `order` ("lr"/"rl")."""
        return coco_prompt(self.subject, self.object, self.axis, style, order)

    @property
    def image(self) -> Image.Image:
        if self.image_path is None:
            raise ValueError(f"COCO item {self.index} (image {self.image_id}) was loaded without an image folder")
        return open_rgb(self.image_path, "COCO image")


def strict_outcome(item: CocoItem, prediction_lr: str, prediction_rl: str) -> str:
    """"golden" (both orders right), "fail_lr_only", "fail_rl_only", "fail_both", or "invalid"
    (an answer off the item's axis; the paper drops such items). Answers are compared after
    `normalize`, the official `norm_token` ("Left." is "left")."""
    predictions = normalize(prediction_lr), normalize(prediction_rl)
    if any(p not in AXIS_OPTIONS[item.axis] for p in predictions):
        return "invalid"
    right_lr, right_rl = (p == item.relation for p in predictions)
    if right_lr and right_rl:
        return "golden"
    if right_lr or right_rl:
        return "fail_rl_only" if right_lr else "fail_lr_only"
    return "fail_both"


def load_coco_spatial(qa_path: str | Path, image_dir: str | Path | None = None,
                      instances_path: str | Path | None = None) -> list[CocoItem]:
    """The spatial entries of a COCO-spatial QA file, in file order.

    Args:
      qa_path: the QA JSON (e.g. coco_qa_two_obj.json).
      image_dir: folder of COCO val2017 images `%012d.jpg`; every needed image must exist.
      instances_path: a COCO instances JSON (images / annotations / categories) for boxes.
    Raises:
      FileNotFoundError naming the missing file; ValueError naming the malformed file.
    """
    qa_path = Path(qa_path)
    entries = read_json(qa_path)
    if not isinstance(entries, list):
        raise ValueError(f"{qa_path}: expected a JSON list of [image_id, caption, distractor], "
                         f"got {type(entries).__name__}")
    sizes, boxes = _read_instances(Path(instances_path)) if instances_path is not None else ({}, {})
    items = []
    for index, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 3 and type(entry[0]) is int
                and isinstance(entry[1], str) and isinstance(entry[2], str)):
            raise ValueError(f"{qa_path}: entry {index} is not [image_id, caption, distractor]: {entry!r}")
        image_id, caption, distractor = entry
        parsed = parse_caption(caption)
        if parsed is None:
            continue
        subject, relation, obj = parsed
        image_path = None
        if image_dir is not None:
            image_path = Path(image_dir) / f"{image_id:012d}.jpg"
            if not image_path.is_file():
                raise FileNotFoundError(f"COCO image not found: {image_path} (entry {index} of {qa_path})")
        items.append(CocoItem(index=index, image_id=image_id, subject=subject, object=obj, relation=relation,
                              caption=caption, distractor=distractor, image_path=image_path,
                              image_size=sizes.get(image_id),
                              subject_box=_largest_box(boxes, image_id, subject),
                              object_box=_largest_box(boxes, image_id, obj)))
    return items


def _read_instances(path: Path) -> tuple[dict[int, tuple[int, int]], dict[int, list[tuple[str, Box, float]]]]:
    """(image id -> (width, height), image id -> [(category name, xyxy box, box area)])."""
    data = read_json(path)
    try:
        names = {c["id"]: c["name"].lower() for c in data["categories"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        boxes: dict[int, list[tuple[str, Box, float]]] = defaultdict(list)
        for annotation in data["annotations"]:
            x, y, w, h = (float(v) for v in annotation["bbox"])
            boxes[annotation["image_id"]].append((names[annotation["category_id"]], (x, y, x + w, y + h), w * h))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a COCO instances file (images/annotations/categories): {error!r}") from error
    return sizes, boxes


def _largest_box(boxes: dict[int, list[tuple[str, Box, float]]], image_id: int, category: str) -> Box | None:
    matches = [(area, box) for name, box, area in boxes.get(image_id, ()) if name == category.lower()]
    # the largest box, the first one on ties (as the official code picks it)
    return max(matches, key=lambda m: m[0])[1] if matches else None


def cap_items(items: Sequence[CocoItem], max_items: int) -> list[CocoItem]:
    """At most `max_items` items as the official --max-items takes them: the first item of each axis
    (horizontal, then vertical), then the rest in file order (0: all)."""
    if max_items <= 0 or max_items >= len(items):
        return list(items)
    if max_items < 2:
        return list(items[:max_items])
    chosen = [next(i for i, it in enumerate(items) if it.axis == axis)
              for axis in ("horizontal", "vertical") if any(it.axis == axis for it in items)]
    chosen += [i for i in range(len(items)) if i not in chosen][:max_items - len(chosen)]
    return [items[i] for i in chosen]


def overlap_tokens(box: Box, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Sorted int32 indices (row * n_cols + col) of every grid cell a pixel box overlaps.

    The official COCO rule (`bbox_to_token_indices_gemma3`, `bbox_to_pixtral_token_indices`, and
    Qwen2-VL's patch-level rule, which gives the same merged tokens): the box's corners, the far
    one pulled in by 1e-3 px, scaled to the grid and floored, clamped to the grid; never empty.
    `geometry.box_to_tokens` is the stricter centre rule.

    Args:
      box: (x0, y0, x1, y1) pixels of an image of `image_size` = (width, height).
      grid: (n_rows, n_cols) of the visual tokens that image becomes.
    """
    width, height = image_size
    n_rows, n_cols = grid
    x0, y0, x1, y1 = box

    def span(lo: float, hi: float, extent: float, n: int) -> range:
        first = min(max(int(lo * n / extent), 0), n - 1)
        last = int((hi - 1e-3) * n / extent) if hi > lo else first
        return range(first, max(first, min(last, n - 1)) + 1)

    return np.array([r * n_cols + c for r in span(y0, y1, height, n_rows) for c in span(x0, x1, width, n_cols)],
                    dtype=np.int32)


def box_in_view(box: Box, view: Box) -> Box | None:
    """A box of the original image in the coordinates of `view`, the window of it the visual tokens
    show (`processor.visible_box`: a centre crop for LLaVA), clipped to it; None if it lies outside."""
    x0, y0 = max(box[0], view[0]) - view[0], max(box[1], view[1]) - view[1]
    x1, y1 = min(box[2], view[2]) - view[0], min(box[3], view[3]) - view[1]
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def boxes_agree(relation: str, subject_tokens: np.ndarray, object_tokens: np.ndarray, n_cols: int, *,
                ties_agree_second: bool = False) -> bool:
    """Whether the mean token centres of the subject and the object agree with `relation`.

    The official probe data drops golden items whose boxes contradict the truth. Left/above needs the
    subject's mean column/row strictly before the object's; right/below strictly after (Gemma 3's
    rule) or, with ties_agree_second (Qwen2-VL's and Pixtral's `(truth is first) == (s < o)`), not
    before.
    """
    along = (lambda t: t % n_cols) if AXES[relation] == "horizontal" else (lambda t: t // n_cols)
    s, o = float(np.mean(along(subject_tokens))), float(np.mean(along(object_tokens)))
    if relation in ("left", "above"):
        return s < o
    return s >= o if ties_agree_second else s > o


def side_labels(item: CocoItem) -> tuple[int, int]:
    """(subject label, object label) of the axis probe: 0 for the first option of the axis (left,
    above), 1 for the second; the object takes the other side."""
    first = AXIS_OPTIONS[item.axis][0]
    return (0, 1) if item.relation == first else (1, 0)
