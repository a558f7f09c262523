"""Geometry registry, slot layout, strips and the pixel-box -> token mapping."""
import numpy as np
import pytest

from spatial_jax import families
from spatial_jax.data.geometry import GEOMETRIES, box_to_tokens, get_geometry
from spatial_jax.data.regions import layout_regions


def test_registry_and_lookup():
    # every registered family's geometry (a new family brings its own) and the organism's
    assert set(GEOMETRIES) == {*families.FAMILIES, "organism"} >= {"qwen2_vl", "gemma3", "pixtral", "organism"}
    assert get_geometry("gemma3") is GEOMETRIES["gemma3"]
    with pytest.raises(KeyError, match="qwen2_vl"):
        get_geometry("no_such_model")


@pytest.mark.parametrize("name, canvas, n_tokens, token_px, size, spacing", [
    ("qwen2_vl", 336, 12, 28, 2, 2), ("gemma3", 896, 16, 56, 3, 3),
    ("pixtral", 240, 15, 16, 2, 2), ("organism", 168, 6, 28, 1, 1),
])
def test_table4_numbers(name, canvas, n_tokens, token_px, size, spacing):
    g = get_geometry(name)
    assert (g.canvas_px, g.n_tokens, g.token_px) == (canvas, n_tokens, token_px)
    assert (g.object_tokens, g.spacing) == (size, spacing)
    assert g.n_visual_tokens == n_tokens ** 2


@pytest.mark.parametrize("name, widths", [
    ("qwen2_vl", (4, 4, 4)), ("gemma3", (5, 6, 5)), ("pixtral", (5, 5, 5)), ("organism", (2, 2, 2)),
])
def test_strip_widths_match_official_code(name, widths):
    assert get_geometry(name).strip_widths() == widths


@pytest.mark.parametrize("name, columns, row", [
    ("qwen2_vl", (1, 5, 9), 5), ("gemma3", (0, 6, 12), 6), ("pixtral", (2, 6, 10), 6), ("organism", (0, 2, 4), 2),
])
def test_slot_origins_follow_the_paper_formula(name, columns, row):
    g = get_geometry(name)
    assert g.slot_origins(horizontal=True) == tuple((row, c) for c in columns)
    assert g.slot_origins(horizontal=False) == tuple((c, row) for c in columns)


def all_shifts(g):
    (a_lo, a_hi), (c_lo, c_hi) = g.max_shift()
    return [(a, c) for a in range(a_lo, a_hi + 1) for c in range(c_lo, c_hi + 1)]


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("horizontal", [True, False])
def test_strips_partition_the_grid_and_hold_their_objects(name, horizontal):
    g = get_geometry(name)
    for shift in all_shifts(g):
        regions = layout_regions(g, horizontal, shift)
        joined = np.concatenate(regions.strips)
        assert sorted(joined) == list(range(g.n_visual_tokens)), "strips must partition the tokens"
        for obj, strip in zip(regions.objects, regions.strips):
            assert set(obj) <= set(strip)
            assert len(obj) == g.object_tokens ** 2
        assert sorted(np.concatenate(regions.objects + (regions.background,))) == list(range(g.n_visual_tokens))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_strips_are_bands_and_outer_strips_mirror(name):
    g = get_geometry(name)
    n = g.n_tokens
    horizontal, vertical = layout_regions(g, True), layout_regions(g, False)
    for h_strip, v_strip, (start, stop) in zip(horizontal.strips, vertical.strips, g.strip_bounds()):
        assert {i % n for i in h_strip} == set(range(start, stop)) and len(h_strip) == n * (stop - start)
        assert {i // n for i in v_strip} == set(range(start, stop)) and len(v_strip) == n * (stop - start)
    left, _, right = g.strip_bounds()
    assert left == (0, n - right[0]), "left and right strips must mirror for the criss-cross swap"


def test_shift_off_canvas_is_rejected():
    g = get_geometry("organism")
    with pytest.raises(ValueError, match="off the 6-token canvas"):
        g.slot_origins(True, shift=(2, 0))


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_object_pixel_box_maps_to_its_object_tokens(name):
    g = get_geometry(name)
    for horizontal in (True, False):
        regions = layout_regions(g, horizontal)
        for (row, col), obj in zip(g.slot_origins(horizontal), regions.objects):
            box = (col * g.token_px, row * g.token_px, (col + g.object_tokens) * g.token_px,
                   (row + g.object_tokens) * g.token_px)
            np.testing.assert_array_equal(g.box_tokens(box, (g.canvas_px, g.canvas_px)), obj)


def test_box_to_tokens_takes_the_cells_whose_centre_it_holds():
    # 4 x 3 cells of 10 px, centres at 5, 15, 25, ...; x1 and y1 are exclusive.
    np.testing.assert_array_equal(box_to_tokens((5, 0, 20, 10), (40, 30), (3, 4)), [0, 1])
    np.testing.assert_array_equal(box_to_tokens((6, 6, 26, 16), (40, 30), (3, 4)), [5, 6])
    np.testing.assert_array_equal(box_to_tokens((-5, -5, 500, 500), (40, 30), (3, 4)), np.arange(12))
    np.testing.assert_array_equal(box_to_tokens((11, 11, 14, 14), (40, 30), (3, 4)), [5])  # holds no centre
    # boxes that touch share no cell
    left, right = (set(box_to_tokens(b, (40, 30), (3, 4))) for b in ((0, 0, 15, 30), (15, 0, 40, 30)))
    assert not left & right
    with pytest.raises(ValueError):
        box_to_tokens((20, 0, 10, 10), (40, 30), (3, 4))


def test_token_grid_per_processor_rule():
    assert get_geometry("qwen2_vl").token_grid((640, 480)) == (17, 23)  # round(480/28), round(640/28)
    assert get_geometry("gemma3").token_grid((640, 480)) == (16, 16)   # always 896 px
    assert get_geometry("pixtral").token_grid((640, 418)) == (27, 40)  # ceil(418/16)
    assert get_geometry("pixtral").token_grid((512, 512)) == (32, 32)
    # Gemma's fixed grid over a non-square photo: cells are 40 x 30 px.
    np.testing.assert_array_equal(get_geometry("gemma3").box_tokens((0, 0, 61, 30), (640, 480)), [0, 1])
