"""COCO-spatial loader on QA / instances JSON and val2017-named JPEG fixtures written here."""
import json

import pytest
from PIL import Image

from spatial_jax.data.coco import load_coco_spatial, parse_caption, strict_outcome
from spatial_jax.data.geometry import get_geometry

QA = [
    [37777, "A photo of a dining table to the left of a refrigerator",
     "A photo of a dining table to the right of a refrigerator"],
    [331352, "A photo of a toilet below a sink", "A photo of a toilet above a sink"],
    [37777, "A photo of a refrigerator to the right of a oven", "A photo of a refrigerator to the left of a oven"],
    [42, "A photo of a cat and a dog", "A photo of a cat and a bird"],
    [524456, "A photo of a laptop above a mouse", "A photo of a laptop below a mouse"],
]


@pytest.fixture
def coco(tmp_path):
    (tmp_path / "val2017").mkdir()
    for image_id in (37777, 331352, 524456):
        Image.new("RGB", (64, 48), (image_id % 255, 80, 160)).save(tmp_path / "val2017" / f"{image_id:012d}.jpg")
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    instances = {
        "images": [{"id": 37777, "width": 640, "height": 480, "file_name": "000000037777.jpg"},
                   {"id": 331352, "width": 480, "height": 640, "file_name": "000000331352.jpg"}],
        "categories": [{"id": 1, "name": "dining table"}, {"id": 2, "name": "refrigerator"}, {"id": 3, "name": "oven"}],
        "annotations": [
            {"id": 10, "image_id": 37777, "category_id": 1, "bbox": [10.0, 200.0, 100.0, 50.0], "area": 4000.0},
            {"id": 11, "image_id": 37777, "category_id": 1, "bbox": [20.0, 300.0, 200.0, 100.0], "area": 15000.0},
            {"id": 12, "image_id": 37777, "category_id": 2, "bbox": [400.0, 40.0, 120.0, 400.0], "area": 40000.0},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    return tmp_path


def test_parse_caption():
    assert parse_caption("A photo of a dining table to the left of a refrigerator") == (
        "dining table", "left", "refrigerator")
    assert parse_caption("A photo of a oven below an umbrella") == ("oven", "below", "umbrella")
    assert parse_caption("A photo of a cup above of the bowl") == ("cup", "above", "bowl")
    assert parse_caption("A photo of a cat and a dog") is None


def test_loads_spatial_entries_with_images_and_boxes(coco):
    items = load_coco_spatial(coco / "qa.json", coco / "val2017", coco / "instances.json")
    assert [(i.index, i.subject, i.relation, i.object, i.axis) for i in items] == [
        (0, "dining table", "left", "refrigerator", "horizontal"),
        (1, "toilet", "below", "sink", "vertical"),
        (2, "refrigerator", "right", "oven", "horizontal"),
        (4, "laptop", "above", "mouse", "vertical"),
    ]
    first = items[0]
    assert first.image.size == (64, 48) and first.image_path.name == "000000037777.jpg"
    assert first.image_size == (640, 480)
    assert first.subject_box == (20.0, 300.0, 220.0, 400.0)  # the larger of the two tables, as xyxy
    assert first.object_box == (400.0, 40.0, 520.0, 440.0)
    assert items[2].object_box is None and items[1].subject_box is None and items[3].image_size is None
    # boxes map to tokens through a geometry's grid for the photo
    tokens = get_geometry("gemma3").box_tokens(first.object_box, first.image_size)
    assert set(tokens % 16) == set(range(10, 13)) and set(tokens // 16) == set(range(1, 15))


def test_prompts_both_orders_per_family(coco):
    table, toilet = load_coco_spatial(coco / "qa.json")[:2]
    assert table.prompt("gemma3", "lr") == ("Is the dining table to the left or to the right of the refrigerator? "
                                             "Answer with one word.")
    assert table.prompt("direct", "rl") == ("Is the dining table to the right or to the left of the refrigerator? "
                                             "Answer with one word.")
    assert toilet.prompt("gemma3", "rl") == "Is the toilet below or above the sink? Answer with one word."
    assert table.prompt("qwen2_vl", "rl") == ("Using the refrigerator as the reference point, which side is the "
                                               "dining table on? Answer with one word: right or left.")
    assert toilet.prompt("pixtral", "lr") == ("Using the sink as the reference point, where is the toilet located? "
                                               "Answer with one word: above or below.")
    with pytest.raises(ValueError, match="option order"):
        table.prompt("anchor", "up")


def test_strict_outcome(coco):
    table, toilet = load_coco_spatial(coco / "qa.json")[:2]
    assert strict_outcome(table, " Left", "left") == "golden"
    assert strict_outcome(table, "right", "left") == "fail_lr_only"
    assert strict_outcome(table, "left", "right") == "fail_rl_only"
    assert strict_outcome(toilet, "above", "above") == "fail_both"
    assert strict_outcome(toilet, "below", "left") == "invalid"


def test_errors_name_the_file(coco):
    (coco / "val2017" / "000000331352.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000331352.jpg"):
        load_coco_spatial(coco / "qa.json", coco / "val2017")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_coco_spatial(coco / "missing.json")
    (coco / "bad.json").write_text('[[37777, "A photo of a cat above a dog", ')
    with pytest.raises(ValueError, match="bad.json.*malformed JSON"):
        load_coco_spatial(coco / "bad.json")
    (coco / "dict.json").write_text('{"37777": []}')
    with pytest.raises(ValueError, match="dict.json"):
        load_coco_spatial(coco / "dict.json")
    (coco / "short.json").write_text('[[37777, "A photo of a cat above a dog"]]')
    with pytest.raises(ValueError, match="short.json: entry 0"):
        load_coco_spatial(coco / "short.json")
    (coco / "inst.json").write_text('{"images": [], "annotations": [{"image_id": 1}]}')
    with pytest.raises(ValueError, match="inst.json"):
        load_coco_spatial(coco / "qa.json", instances_path=coco / "inst.json")


def test_unreadable_image_is_named(coco):
    (coco / "val2017" / "000000037777.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="000000037777.jpg"):
        load_coco_spatial(coco / "qa.json", coco / "val2017")[0].image
    with pytest.raises(ValueError, match="without an image folder"):
        load_coco_spatial(coco / "qa.json")[0].image
