"""Every bad input at the API boundary fails with one clear error naming the argument, before
anything is traced (spatial_jax/validation.py): no silent no-ops, NaNs or JAX tracebacks."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import spatial_jax as sj
from experiments.random_checkpoint import write_random_checkpoint

forward_lib = importlib.import_module("spatial_jax.forward")  # the module; sj.forward is the function
sweep_lib = importlib.import_module("spatial_jax.sweeps.sweep")

L = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_random_checkpoint(str(tmp_path_factory.mktemp("ckpt")), layers=L)
    model = sj.load(path)
    image = Image.new("RGB", (168, 168), "white")
    batch = model.prepare(images=[image, image], prompts=["what is left of red", "what is right of red"])
    return path, model, batch, image


@pytest.fixture
def no_trace(monkeypatch):
    """Fails the test if a compiled function is reached: the checks must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("reached the jitted function")
    for module, name in ((forward_lib, "_apply_jit"), (forward_lib, "_next_token_jit"), (sweep_lib, "_variants_jit"),
                         (sweep_lib, "_restart_points_jit")):
        monkeypatch.setattr(module, name, boom, raising=False)  # raising=False: a renamed one is no check lost


def _replace(batch, model, **kwargs):
    B, T = batch.input_ids.shape
    fields = dict(site="lm.resid_post", op="replace", layer=0,
                  source=np.zeros((B, T, model.config.hidden_size), np.float32))
    return sj.Intervention(**{**fields, **kwargs})


def _raises(error, *names):
    """pytest.raises(error) whose message must name every one of `names`."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(error)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for name in names:
                assert name in message, (name, message)
            return result
    return Check()


@pytest.mark.parametrize("layer", [-1, 99, L + 1])
def test_layer_out_of_range(setup, no_trace, layer):
    _, model, batch, _ = setup
    with _raises(ValueError, "interventions[0]", ".layer", f"[0, {L})", f"got {layer}"):
        sj.forward(model, batch, interventions=[_replace(batch, model, layer=layer)])


def test_layer_out_of_range_in_a_sweep_variant(setup, no_trace):
    _, model, batch, _ = setup
    B, T = batch.input_ids.shape
    iv = _replace(batch, model, layer=np.array([0, 1, 7]),
                  source=np.zeros((3, B, T, model.config.hidden_size), np.float32))
    with _raises(ValueError, "interventions[0]", ".layer", "got 7"):
        sj.patch_sweep(model, batch, [iv], sj.Readout(np.array([T - 1] * B), np.array([1])))


def test_index_beyond_the_source(setup, no_trace):
    _, model, batch, _ = setup
    B, T = batch.input_ids.shape
    with _raises(ValueError, ".index", f"< {T}", f"got {T}"):
        sj.forward(model, batch, interventions=[_replace(batch, model, index=np.full((B, T), T))])
    short = np.zeros((B, 5, model.config.hidden_size), np.float32)  # a source of 5 tokens
    with _raises(ValueError, ".index", "< 5", "got 7"):
        sj.forward(model, batch, interventions=[_replace(batch, model, source=short, index=np.full((B, T), 7))])


def test_index_below_minus_one(setup, no_trace):
    _, model, batch, _ = setup
    B, T = batch.input_ids.shape
    with _raises(ValueError, ".index", ">= -1", "got -2"):
        sj.forward(model, batch, interventions=[_replace(batch, model, index=np.full((B, T), -2))])


def test_index_shape(setup, no_trace):
    _, model, batch, _ = setup
    B, T = batch.input_ids.shape
    with _raises(ValueError, ".index", f"[B, T] = [{B}, {T}]", f"got shape [{T}]"):
        sj.forward(model, batch, interventions=[_replace(batch, model, index=np.arange(T))])
    with _raises(ValueError, ".index", f"got shape [{B}, {T + 1}]"):
        sj.forward(model, batch, interventions=[_replace(batch, model, index=np.zeros((B, T + 1), np.int32))])


def test_source_shape(setup, no_trace):
    _, model, batch, _ = setup
    B, T = batch.input_ids.shape
    D = model.config.hidden_size
    with _raises(ValueError, ".source", f"[B, S, D] = [{B}, S, {D}]", f"got shape [{T}, {D}]"):
        sj.forward(model, batch, interventions=[_replace(batch, model, source=np.zeros((T, D), np.float32))])
    with _raises(ValueError, ".source", f"got shape [{B}, {T}, {D + 1}]"):
        sj.forward(model, batch, interventions=[_replace(batch, model, source=np.zeros((B, T, D + 1), np.float32))])
    with _raises(ValueError, ".source", f"got shape [{B + 1}, {T}, {D}]"):
        sj.forward(model, batch, interventions=[_replace(batch, model, source=np.zeros((B + 1, T, D), np.float32))])


def test_directions_shape(setup, no_trace):
    _, model, batch, _ = setup
    D = model.config.hidden_size
    iv = sj.Intervention(site="lm.resid_pre", op="amplify", layer=0, directions=np.ones((D + 2, 3), np.float32))
    with _raises(ValueError, ".directions", f"[D, K] = [{D}, K]", f"got shape [{D + 2}, 3]"):
        sj.next_token_logits(model, batch, [iv])


def test_readout_token_beyond_the_vocabulary(setup, no_trace):
    _, model, batch, _ = setup
    B, T = batch.input_ids.shape
    V = model.config.vocab_size
    with _raises(ValueError, "Readout.tokens", f"[0, {V})", f"got {V}"):
        sj.patch_sweep(model, batch, [_replace(batch, model)], sj.Readout(np.full((B,), T - 1), np.array([1, V])))


def test_readout_position(setup, no_trace):
    _, model, batch, _ = setup
    B, T = batch.input_ids.shape
    with _raises(ValueError, "Readout.position", f"[B] = [{B}]", "a scalar"):
        sj.patch_sweep(model, batch, [_replace(batch, model)], sj.Readout(T - 1, np.array([1])))
    with _raises(ValueError, "Readout.position", f"[0, {T})", f"got {T}"):
        sj.patch_sweep(model, batch, [_replace(batch, model)], sj.Readout(np.full((B,), T), np.array([1])))


def test_cache_as_one_string_is_one_site(setup):
    _, model, batch, _ = setup
    out = sj.forward(model, batch, cache="lm.resid_post", logits=False)
    assert out.cache["lm.resid_post"].shape[:2] == (batch.input_ids.shape[0], L)
    with _raises(ValueError, "cache", "'lm.resid'"):
        sj.forward(model, batch, cache=("lm.resid",))


def test_load_dtype_aliases_and_names(setup):
    path, _, _, _ = setup
    assert sj.load(path, dtype="bf16").dtype == "bfloat16"
    assert sj.load(path, dtype=jnp.float32).dtype == "float32"
    with _raises(ValueError, "dtype", "'float32'", "'bfloat16'", "got 'half'"):
        sj.load(path, dtype="half")


def test_prepare_images_not_a_list(setup):
    _, model, _, image = setup
    with _raises(TypeError, "images", "one entry per prompt", "images=[img]"):
        model.prepare(images=image, prompts=["what is left of red"])


def test_prepare_empty_lists(setup):
    _, model, _, _ = setup
    with _raises(ValueError, "prompts", "empty"):
        model.prepare(images=[], prompts=[])


def test_prepare_counts_differ(setup):
    _, model, _, image = setup
    with _raises(ValueError, "images", "1 prompts but 2 image entries"):
        model.prepare(images=[image, image], prompts=["what is left of red"])


def test_prepare_prompt_is_a_string(setup):
    _, model, _, image = setup
    with _raises(TypeError, "prompts", "list of strings", "not a string"):
        model.prepare(images=[image], prompts="what is left of red")


def test_prepare_image_of_a_wrong_type_or_mode(setup):
    _, model, _, image = setup
    with _raises(TypeError, "images[0]", "PIL.Image.Image", "ndarray"):
        model.prepare(images=[np.asarray(image)], prompts=["what is left of red"])
    with _raises(ValueError, "image mode", "'F'"):  # 32-bit float pixels: HF's convert_to_rgb refuses them too
        model.prepare(images=[image.convert("F")], prompts=["what is left of red"])


def test_batch_without_image_slots_for_its_pixels(setup, no_trace):
    _, model, batch, _ = setup
    text = model.prepare(images=None, prompts=["what is left of red", "what is right of red"])
    bad = sj.Batch(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=batch.pixel_values,
                   image_grid_thw=batch.image_grid_thw)
    with pytest.raises(ValueError) as info:
        sj.forward(model, bad)
    assert "\n" not in str(info.value) and "image" in str(info.value)


def test_traced_values_are_not_read_but_shapes_are(setup):
    """Inside a user's jit the layer is a tracer: no host check, and the forward runs."""
    _, model, batch, _ = setup
    iv = lambda layer: _replace(batch, model, layer=layer)  # noqa: E731
    patched = jax.jit(lambda layer: sj.forward(model, batch, interventions=[iv(layer)]).logits)(jnp.int32(1))
    assert patched.shape[:2] == batch.input_ids.shape and bool(jnp.isfinite(patched).all())
    with pytest.raises(ValueError, match="index"):
        jax.jit(lambda layer: sj.forward(model, batch, interventions=[_replace(batch, model, layer=layer,
                                                                                index=np.arange(3))]).logits)(1)
