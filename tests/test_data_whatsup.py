"""What'sUp stitcher and items, on controlled_images-style JPEG fixtures written here."""
import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from spatial_jax.data.geometry import get_geometry
from spatial_jax.data.whatsup import side_objects, single_token_objects, stitch, whatsup_item, whatsup_items
from spatial_jax.data.whatsup_regions import BBOX_NORM

SIDES = ("mug", "book", "cap", "water-bottle")
# Each photo's object half is painted the object's colour, the other half the photo's own grey.
COLOURS = {"mug": (200, 30, 30), "book": (30, 160, 40), "cap": (40, 60, 200), "water-bottle": (220, 200, 20)}
GREY = {"left": (90, 90, 90), "right": (170, 170, 170)}


def write_photo(folder, obj, direction, middle, size=(240, 180)):
    image = Image.new("RGB", size, GREY[direction])
    half = size[0] // 2
    box = (0, 0, half, size[1]) if direction == "left" else (half, 0, size[0], size[1])
    image.paste(COLOURS[obj], box)
    image.save(folder / f"{obj}_{direction}_of_{middle}.jpeg", quality=95)


@pytest.fixture
def folder(tmp_path):
    for middle in ("chair", "table"):
        for obj in SIDES:
            for direction in ("left", "right"):
                write_photo(tmp_path, obj, direction, middle)
    write_photo(tmp_path, "mug", "left", "armchair")  # no right_of photo: not a side object
    return tmp_path


def word_tokenizer(words):
    """WordPiece over whole `words` plus single letters, so other words split into several tokens."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["[UNK]", *words, *letters, *(l.upper() for l in letters), *("##" + l for l in letters), "-"]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_side_objects_are_discovered(folder):
    assert side_objects(folder, "chair") == sorted(SIDES)
    assert side_objects(folder, "armchair") == []
    with pytest.raises(FileNotFoundError, match="nowhere"):
        side_objects(folder / "nowhere", "chair")


def test_stitch_takes_the_outer_halves(folder):
    scene = np.asarray(stitch(folder, "mug", "chair", "cap", 336)).astype(int)
    assert scene.shape == (336, 336, 3)
    assert np.abs(scene[:, :160] - COLOURS["mug"]).max() < 12
    assert np.abs(scene[:, 176:] - COLOURS["cap"]).max() < 12


def test_items_count_prompt_answer_and_images(folder):
    g = get_geometry("qwen2_vl")
    items = whatsup_items(folder, g)
    assert len(items) == 2 * (4 * 3) * 2  # middles x P(4, 2) x {left, right}
    left, right = items[0], items[1]
    assert left.prompt == "The object on the floor to the left of the chair is a(n) "
    assert right.prompt == "The object on the floor to the right of the chair is a(n) "
    assert (left.answer, left.entities) == ("book", ("book", "chair", "cap"))
    assert (right.answer, right.entities) == ("book", ("cap", "chair", "book"))
    pixels = np.asarray(right.image).astype(int)
    assert right.image.size == (g.whatsup_px, g.whatsup_px)
    assert np.abs(pixels[:, :160] - COLOURS["cap"]).max() < 12
    assert np.abs(pixels[:, 176:] - COLOURS["book"]).max() < 12
    assert {i.direction for i in items} == {"left", "right"}
    assert all(i.answer == i.entities[i.target_slot] for i in items)


def test_answers_filtered_to_single_tokens(folder):
    tok = word_tokenizer(["mug", "Mug", "book", "Book", "cap", "water", "bottle"])  # no "Cap"
    assert single_token_objects(sorted(SIDES), tok) == ["book", "mug"]
    items = whatsup_items(folder, get_geometry("organism"), tokenizer=tok, middles=["table"])
    assert len(items) == 2 * 2 and {i.answer for i in items} == {"book", "mug"}
    as_callable = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    assert single_token_objects(sorted(SIDES), as_callable) == ["book", "mug"]


def test_regions_from_pixel_boxes(folder):
    g = get_geometry("qwen2_vl")  # 336 px -> 12 x 12 tokens of 28 px
    boxes = [(28, 224, 84, 280), (140, 56, 196, 308), (252, 224, 336, 336)]
    item = whatsup_item(folder, g, ("mug", "chair", "book"), "left", boxes=boxes)
    r = item.regions
    np.testing.assert_array_equal(r.objects[0], [97, 98, 109, 110])        # rows 8-9, cols 1-2
    np.testing.assert_array_equal(r.objects[2], [105, 106, 107, 117, 118, 119, 129, 130, 131, 141, 142, 143])
    # middle box: cols 5-6, rows 2-10
    assert set(r.objects[1] % 12) == {5, 6} and set(r.objects[1] // 12) == set(range(2, 11))
    np.testing.assert_array_equal(r.strips[0], sorted(12 * row + c for row in range(12) for c in (1, 2)))
    assert set(r.background) == set(range(144)) - set(np.concatenate(r.objects))


@pytest.mark.parametrize("name, grid", [("qwen2_vl", 12), ("gemma3", 16), ("pixtral", 32)])
def test_default_boxes_map_through_each_geometry(folder, name, grid):
    items = whatsup_items(folder, get_geometry(name), middles=["chair", "table"])
    for item in items[::5]:
        r = item.regions
        assert r.grid == (grid, grid)
        left, middle, right = (set(o) for o in r.objects)
        assert left and middle and right
        # the official boxes (bbox_norm_to_patches) may share their border column on 12 x 12 (the
        # chair's middle and right boxes, the armchair's left and middle), never more
        cols = [sorted({t % grid for t in o}) for o in (left, middle, right)]
        assert cols[0][0] < cols[1][0] < cols[2][0] and cols[0][-1] <= cols[1][-1] <= cols[2][-1]
        assert cols[0][-1] <= cols[1][0] and cols[1][-1] <= cols[2][0]
        if grid > 12:
            assert not (left & middle) and not (middle & right)
    assert set(BBOX_NORM) == {"chair", "table", "armchair"}


def test_missing_and_broken_photos_are_named(folder):
    with pytest.raises(FileNotFoundError, match="lamp_left_of_chair.jpeg"):
        stitch(folder, "lamp", "chair", "mug", 336)
    (folder / "cap_right_of_chair.jpeg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cap_right_of_chair.jpeg"):
        stitch(folder, "mug", "chair", "cap", 336)
    with pytest.raises(ValueError, match="horizontal only"):
        whatsup_item(folder, get_geometry("qwen2_vl"), ("mug", "chair", "cap"), "above")
