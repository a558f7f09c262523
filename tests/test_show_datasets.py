"""experiments.show_datasets, run as a subprocess (its flags share names with the experiments'):
one PNG per dataset, each a readable picture with the token regions drawn over the item."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from test_data_whatsup import write_photo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEOMETRY = "qwen2_vl"
DATASETS = ("squares", "shapes", "objects", "whatsup", "coco")
# matplotlib's tab:orange, tab:purple, tab:cyan: the outlines of slots 0, 1, 2 (opaque, 2 px).
SLOT_RGB = ((255, 127, 14), (148, 103, 189), (23, 190, 207))


def _coco_folder(root) -> str:
    """One COCO-spatial question with its photo and an instances file giving both boxes."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.new("RGB", (320, 240), (60, 120, 90)).save(root / "val2017" / f"{7:012d}.jpg")
    (root / "coco_qa_two_obj.json").write_text(json.dumps(
        [[7, "A photo of a cup to the left of a laptop", "A photo of a cup to the right of a laptop"]]))
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({
        "images": [{"id": 7, "width": 320, "height": 240, "file_name": f"{7:012d}.jpg"}],
        "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "laptop"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 100, 60, 60], "area": 3600},
                        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [180, 60, 120, 120], "area": 14400}]}))
    return str(root)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, np.ndarray]:
    """dataset -> the RGB pixels of its PNG, from one run over all five datasets."""
    tmp = tmp_path_factory.mktemp("show_datasets")
    whatsup = tmp / "controlled_images"
    whatsup.mkdir()
    for obj in ("mug", "book"):
        for side in ("left", "right"):
            write_photo(whatsup, obj, side, "chair")
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.show_datasets", f"--geometry={GEOMETRY}",
                           f"--output_dir={out}", f"--whatsup_dir={whatsup}", f"--coco_dir={_coco_folder(tmp / 'coco')}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(f"{d}_{GEOMETRY}.png" for d in DATASETS)
    pixels = {}
    for dataset in DATASETS:
        path = out / f"{dataset}_{GEOMETRY}.png"
        with Image.open(path) as image:
            image.verify()  # a whole, well-formed PNG (checksums included)
        with Image.open(path) as image:
            assert image.format == "PNG"
            pixels[dataset] = np.asarray(image.convert("RGB"))
    return pixels


@pytest.mark.parametrize("dataset", DATASETS)
def test_each_dataset_has_a_picture_with_its_regions(pictures, dataset):
    rgb = pictures[dataset]
    height, width, _ = rgb.shape
    assert 500 <= width <= 2000 and 400 <= height <= 1000, (width, height)  # figures of 6.5-11 x 4.8-5 in
    packed = (rgb.astype(np.uint32) << [16, 8, 0]).sum(-1)  # one int per colour: a fast unique
    assert len(np.unique(packed)) > 100  # a picture, not a blank canvas
    n_slots = 2 if dataset == "coco" else 3  # COCO's regions are its two boxes
    for colour in SLOT_RGB[:n_slots]:  # every slot's object outline is drawn (>= 780 px of it
        # here; the legend's handle alone is ~75 px)
        assert (rgb == colour).all(-1).sum() > 400, (dataset, colour)


def test_datasets_give_different_pictures(pictures):
    names = list(pictures)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            same_shape = pictures[a].shape == pictures[b].shape
            assert not same_shape or (pictures[a] != pictures[b]).any(-1).mean() > 0.01, (a, b)
