"""Squares, Shapes and Objects: counts, prompts, regions against the rendered pixels, determinism."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from spatial_jax.data import sprites
from spatial_jax.data.geometry import GEOMETRIES, get_geometry
from spatial_jax.data.synthetic import (OBJECTS, SHAPES, SQUARE_COLOURS, TASKS, generate, make_task,
                                        split_triples)

COUNTS = {"squares": 480, "shapes": 480, "objects": 1344}
PIXTRAL_COUNTS = {**COUNTS, "objects": 840}  # the official Pixtral object set has no bomb


def inked_tokens(image: Image.Image, geometry) -> np.ndarray:
    """Sorted indices of the token cells holding any non-white pixel."""
    n, p = geometry.n_tokens, geometry.token_px
    pixels = np.asarray(image.convert("RGB")).reshape(n, p, n, p, 3)
    return np.flatnonzero((pixels != 255).any(axis=(1, 3, 4)))


def check_regions_against_pixels(item, geometry):
    """Objects and squares ink exactly their slots' tokens; the official shapes ink only tokens of
    their slots (a 3x3-token triangle, star or cross leaves corner cells white)."""
    inked = inked_tokens(item.image, geometry)
    slots = np.sort(np.concatenate(item.regions.objects))
    if item.task == "shapes":
        assert np.isin(inked, slots).all()
        assert all(np.isin(region, inked).sum() >= len(region) - 4 for region in item.regions.objects)
    else:
        np.testing.assert_array_equal(inked, slots)
        np.testing.assert_array_equal(np.setdiff1d(np.arange(geometry.n_visual_tokens), inked), item.regions.background)
    np.testing.assert_array_equal(np.setdiff1d(np.arange(geometry.n_visual_tokens), slots), item.regions.background)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_item_counts_and_region_bounds(task, name):
    g = get_geometry(name)
    items = generate(task, g)
    assert len(items) == (PIXTRAL_COUNTS if name == "pixtral" else COUNTS)[task]
    for item in items[:: 37]:
        r = item.regions
        assert r.grid == (g.n_tokens, g.n_tokens)
        for region in r.objects + r.strips + (r.background,):
            assert region.dtype == np.int32 and region.min() >= 0 and region.max() < g.n_visual_tokens
        assert item.image.size == (g.canvas_px, g.canvas_px)


def test_prompts_answers_and_slots():
    squares = generate("squares", "qwen2_vl", triples=[("red", "green", "blue")])
    assert [(i.direction, i.prompt, i.answer) for i in squares] == [
        ("left", "The color of the square to the left of the green square is ", "red"),
        ("right", "The color of the square to the right of the green square is ", "blue"),
        ("above", "The color of the square above the green square is ", "red"),
        ("below", "The color of the square below the green square is ", "blue"),
    ]
    shape = generate("shapes", "qwen2_vl", triples=[("red square", "green circle", "blue triangle")],
                     directions=["right"])[0]
    assert shape.prompt == "The color of the shape to the right of the green circle is "
    assert (shape.answer, shape.entities[2], shape.attributes) == ("blue", "blue triangle", ("red", "green", "blue"))
    obj = generate("objects", "gemma3", triples=[("apple", "key", "hat")], directions=["above"])[0]
    assert obj.prompt == "The object above the key is a(n) "
    assert (obj.answer, obj.entities, obj.target_slot, obj.horizontal) == ("apple", ("apple", "key", "hat"), 0, False)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name, step", [("organism", 1), ("qwen2_vl", 3), ("pixtral", 3), ("gemma3", 29)])
def test_object_regions_are_exactly_the_inked_tokens(task, name, step):
    g = get_geometry(name)
    for item in generate(task, g)[::step]:
        check_regions_against_pixels(item, g)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_every_object_drawing_reaches_every_token_of_its_slot(name):
    g = get_geometry(name)
    side, s = g.object_tokens * g.token_px, g.object_tokens
    drawn = [sprites.object_sprite(o, side) for o in OBJECTS]
    for sprite in drawn:
        alpha = np.asarray(sprite)[..., 3].reshape(s, g.token_px, s, g.token_px)
        assert ((alpha > 0).sum(axis=(1, 3)) > 0).all()


def test_square_colours_sit_in_their_slots():
    g = get_geometry("qwen2_vl")
    for item in generate("squares", g)[::11]:
        pixels = np.asarray(item.image)
        for region, colour in zip(item.regions.objects, item.entities):
            row, col = divmod(int(region[0]), g.n_tokens)
            assert tuple(pixels[row * g.token_px, col * g.token_px]) == SQUARE_COLOURS[colour]


def test_same_seed_same_images_and_jitter_is_opt_in():
    g = get_geometry("organism")
    default = generate("squares", g)
    for seed in (0, 7):
        again = generate("squares", g, seed=seed)
        assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(default[::13], again[::13]))
    jittered = generate("squares", g, jitter=2, seed=3)
    same_seed = generate("squares", g, jitter=2, seed=3)
    assert [a.image.tobytes() for a in jittered] == [b.image.tobytes() for b in same_seed]
    other = generate("squares", g, jitter=2, seed=4)
    assert any(a.image.tobytes() != b.image.tobytes() for a, b in zip(jittered, other))
    assert any(a.image.tobytes() != b.image.tobytes() for a, b in zip(jittered, default))
    for item in jittered:
        check_regions_against_pixels(item, g)
        assert sorted(np.concatenate(item.regions.strips)) == list(range(g.n_visual_tokens))
        for obj, strip in zip(item.regions.objects, item.regions.strips):
            assert set(obj) <= set(strip)


def test_subset_jitter_matches_full_set():
    task = make_task("shapes", "organism")
    full = {(i.entities, i.direction): i for i in task.items(jitter=1, seed=5)}
    subset = task.items(triples=task.triples()[10:13], jitter=1, seed=5)
    for item in subset:
        assert item.image.tobytes() == full[item.entities, item.direction].image.tobytes()


def test_extra_colours_keep_the_default_items():
    g = get_geometry("organism")
    extra = make_task("squares", g, colours={**SQUARE_COLOURS, "orange": (255, 165, 0), "purple": (128, 0, 128)})
    assert len(extra.items()) == 8 * 7 * 6 * 4
    default = generate("squares", g)
    same = extra.items(triples=[i.entities for i in default[::4]])
    for a, b in zip(default, same):
        assert (a.prompt, a.answer, a.direction) == (b.prompt, b.answer, b.direction)
        assert a.image.tobytes() == b.image.tobytes()
        np.testing.assert_array_equal(np.concatenate(a.regions.objects), np.concatenate(b.regions.objects))


def test_split_triples_is_seeded_and_disjoint():
    triples = make_task("squares", "organism").triples()
    train, held = split_triples(triples, n_held_out=20, seed=0)
    assert len(train) == 100 and len(held) == 20 and not set(train) & set(held)
    assert split_triples(triples, 20, seed=0) == (train, held)
    assert split_triples(triples, 20, seed=1)[1] != held


def test_thumbnail_folder_replaces_the_drawings(tmp_path):
    colours = {o: (30 * k, 200 - 20 * k, 90) for k, o in enumerate(OBJECTS)}
    for name, colour in colours.items():
        thumb = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
        ImageDraw.Draw(thumb).rectangle([0, 0, 99, 99], fill=(*colour, 255))
        thumb.save(tmp_path / f"{name}.png")
    g = get_geometry("qwen2_vl")
    item = generate("objects", g, thumbnail_dir=tmp_path, triples=[("pot", "rose", "key")], directions=["left"])[0]
    pixels = np.asarray(item.image)
    for region, name in zip(item.regions.objects, item.entities):
        row, col = divmod(int(region[0]), g.n_tokens)
        assert tuple(pixels[row * g.token_px + 10, col * g.token_px + 10]) == colours[name]
    (tmp_path / "bomb.png").unlink()
    with pytest.raises(FileNotFoundError, match="bomb.png"):
        make_task("objects", g, thumbnail_dir=tmp_path)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("circles", "organism")
    with pytest.raises(KeyError, match="purple"):
        make_task("squares", "organism").item(("red", "purple", "blue"), "left")
    with pytest.raises(ValueError, match="unknown direction"):
        make_task("squares", "organism").item(("red", "green", "blue"), "behind")
