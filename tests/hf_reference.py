"""Helpers the tiny-checkpoint fixtures of every family share: random HF weights, checkpoint
renaming, the per-session checkpoint cache, the word-level test tokenizer, HF processor chats,
left-padded inputs and the hooked HF reference run.

Importable from any test module (pytest puts tests/ on sys.path; tests/ has no __init__.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from typing import Any, Callable, Sequence

import numpy as np
import pytest

# ----------------------------------------------------------------------------------------------
# Checkpoints


def default_init(name: str, p, noise):
    """A parameter's random value: biases N(0, 0.1^2), norm weights 1 + N(0, 0.2^2), embeddings
    N(0, 0.5^2), Linear/Conv weights N(0, 1/fan_in). Nothing stays at HF's init (zero biases, unit
    norms), so a key-map, transform or layout mistake shows up in the logits."""
    if name.endswith("bias"):
        return 0.1 * noise
    if p.ndim == 1:
        return 1.0 + 0.2 * noise
    if "embed_tokens" in name:
        return 0.5 * noise
    return noise / math.sqrt(p[0].numel())


def randomize_(model, seed: int = 0, init: Callable = default_init) -> None:
    """Every parameter random, in place, as init(name, p, noise) with noise N(0, 1) of p's shape
    (a tied parameter is listed once, so it stays tied)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(init(name, p, noise).to(p.dtype))


def rename_checkpoint(src_dir: str, dst_dir: str, rename) -> list[str]:
    """Copies a checkpoint dir, renaming every tensor with `rename(name) -> name`. Returns the names."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, "model.safetensors")
    renamed = {rename(k): v for k, v in load_file(path).items()}
    save_file(renamed, path, metadata={"format": "pt"})
    return sorted(renamed)


class Checkpoints:
    """Tiny HF checkpoints of one family, each variant built once per session on first use.

    hf_dir(variant): the save_pretrained dir; hf_model(variant): transformers' model loaded from it
    (eager, float32); model(variant, dtype): `sj.load` of it. A subclass names the family (PREFIX),
    its VARIANTS (variant -> builder keyword arguments) and the family's `build(path, seed, **kw)`
    and `load_hf(path)`; variant v is built with seed len(v).
    """

    PREFIX: str
    VARIANTS: dict[str, dict[str, Any]]

    def __init__(self, root):
        self._root = root
        self._dirs: dict = {}
        self._hf: dict = {}
        self._sj: dict = {}

    def hf_dir(self, variant: str = "base") -> str:
        if variant not in self._dirs:
            path = str(self._root / f"{self.PREFIX}_{variant}")
            self._dirs[variant] = self.build(path, seed=len(variant), **self.VARIANTS[variant])
        return self._dirs[variant]

    def hf_model(self, variant: str = "base"):
        if variant not in self._hf:
            self._hf[variant] = self.load_hf(self.hf_dir(variant))
        return self._hf[variant]

    def model(self, variant: str = "base", dtype: str = "float32"):
        key = (variant, dtype)
        if key not in self._sj:
            import spatial_jax as sj

            self._sj[key] = sj.load(self.hf_dir(variant), dtype=dtype)
        return self._sj[key]


# ----------------------------------------------------------------------------------------------
# Processor dir


def word_level_tokenizer(tokens: Sequence[str], special_tokens: Sequence[str], bos: str):
    """The `tokenizers` object: WordLevel over tokens (ids in that order); a regex pre-tokenizer
    ("\\n\\n", "\\n", words, single punctuation; spaces separate); special_tokens added whole; a
    post-processor that prepends bos, as Gemma's and Pixtral's tokenizer.json do."""
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n\n|\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return tok


def resave_processor_dir(out_dir: str, write_hub: Callable[[str], Any], load_processor: Callable[[str], Any]) -> str:
    """Rewrites out_dir in the layout transformers' processor save_pretrained writes: the hub files
    are written to a staging dir by write_hub(dir), loaded with load_processor(dir) and saved into
    out_dir in place of any hub files there."""
    staging = out_dir.rstrip("/") + ".staging"
    write_hub(staging)
    proc = load_processor(staging)
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.json", "tokenizer.json",
                 "tokenizer_config.json"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    proc.save_pretrained(out_dir)
    shutil.rmtree(staging)
    return out_dir


def write_processor_files(out_dir: str, layout: str, tokenizer, tokenizer_config: dict, hub_files: dict,
                          write_hub: Callable[[str], Any], load_processor: Callable[[str], Any]) -> str:
    """A processor dir: tokenizer.json (the `tokenizers` object) and tokenizer_config.json, then in
    layout "hub" the hub's json files (name -> content), in layout "saved" what transformers'
    processor save_pretrained writes for the same processor (`resave_processor_dir` with
    write_hub(dir), which writes the hub layout, and load_processor(dir))."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=1)
    if layout == "saved":
        return resave_processor_dir(out_dir, write_hub, load_processor)
    if layout != "hub":
        raise ValueError(f"unknown layout {layout!r}")
    for name, content in hub_files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=1)
    return out_dir


def hf_chat_inputs(proc, images: Sequence[Any], prompts: Sequence[str], system_content=None) -> dict[str, np.ndarray]:
    """HF's reference: `proc.apply_chat_template(conversations, tokenize=True, padding=True)` with
    the images inline in each user turn (before the text), and a system turn of system_content
    unless it is None. numpy arrays."""
    conversations = []
    for entry, prompt in zip(images, prompts):
        entry = [] if entry is None else (list(entry) if isinstance(entry, (list, tuple)) else [entry])
        conv = [] if system_content is None else [{"role": "system", "content": system_content}]
        conv.append({"role": "user", "content": [*({"type": "image", "image": im} for im in entry),
                                                 {"type": "text", "text": prompt}]})
        conversations.append(conv)
    out = proc.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="np", processor_kwargs={"padding": True})
    return {k: np.asarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Model inputs and the HF reference run


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, pad_left: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token rows -> input_ids, attention_mask [B, T_max], padded with pad_id on one side."""
    T = max(map(len, rows))
    input_ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for b, ids in enumerate(rows):
        sl = slice(T - len(ids), T) if pad_left else slice(0, len(ids))
        input_ids[b, sl], mask[b, sl] = ids, 1
    return input_ids, mask


def hf_position_ids(mask: np.ndarray) -> np.ndarray:
    """HF generate's rule, `where(mask, cumsum(mask) - 1, 0)`, which our ports use."""
    return np.where(mask > 0, np.cumsum(mask, 1) - 1, 0)


def install_hooks(hooks) -> list:
    """(module, "pre" | "post", fn) hooks that patch a module's first input / its output with
    fn(tensor) -> tensor, installed in order; returns their handles."""
    def patch_input(fn):
        def hook(_module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return hook

    def patch_output(fn):
        def hook(_module, _args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
        return hook

    return [module.register_forward_pre_hook(patch_input(fn), with_kwargs=True) if kind == "pre"
            else module.register_forward_hook(patch_output(fn)) for module, kind, fn in hooks]


def hf_run(hf, inputs: dict[str, np.ndarray], attn_out: Callable, mlp_out: Callable, vision_blocks,
           hooks=(), projector=None) -> dict[str, np.ndarray]:
    """Runs a HF vision-language model (hf.model.language_model, a vision tower, a projector)
    with forward hooks; float32 numpy arrays in our site layout: "logits" [B, T, V],
    "hidden_states" [L+1, B, T, D], lm.resid_pre/attn_out/mlp_out/resid_post [B, L, T, D],
    lm.final [B, T, D], and with images vision.block_out [n, Lv, N, Dv] and vision.tokens
    [n, N', D] (n = 1 for a tower that concatenates every image's patches unbatched, as
    Qwen2-VL's does).

    attn_out(layer) / mlp_out(layer): the decoder layer's module whose output the family adds to
    the residual; vision_blocks: the vision tower's blocks; projector: the module whose output is
    vision.tokens (default hf.model.multi_modal_projector). hooks: (module, "pre" | "post", fn)
    that patch the module's input / output hidden states with fn(tensor) -> tensor, as the paper's
    code patches; installed first, so the recorded sites see what they change."""
    import torch

    lm = hf.model.language_model
    got: dict[str, list] = {k: [] for k in ("pre", "attn", "mlp", "post", "final", "block", "tokens")}

    def keep(key):
        def hook(_module, _args, out):
            a = (out[0] if isinstance(out, tuple) else out).detach().float().numpy().copy()
            got[key].append(a[None] if a.ndim == 2 else a)  # an unbatched tower's [N, D]
        return hook

    def keep_input(key):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            got[key].append(h.detach().float().numpy().copy())
        return hook

    handles = install_hooks(hooks)
    handles.append(lm.norm.register_forward_hook(keep("final")))
    for layer in lm.layers:
        handles += [layer.register_forward_pre_hook(keep_input("pre"), with_kwargs=True),
                    attn_out(layer).register_forward_hook(keep("attn")),
                    mlp_out(layer).register_forward_hook(keep("mlp")),
                    layer.register_forward_hook(keep("post"))]
    for layer in vision_blocks:
        handles.append(layer.register_forward_hook(keep("block")))
    projector = hf.model.multi_modal_projector if projector is None else projector
    handles.append(projector.register_forward_hook(keep("tokens")))
    kw = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    if "pixel_values" in kw:
        kw["pixel_values"] = kw["pixel_values"].to(hf.dtype)
    try:
        with torch.no_grad():
            out = hf(**kw, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    res = {"logits": out.logits.float().numpy(), "hidden_states": np.stack([h.float().numpy() for h in out.hidden_states]),
           "lm.resid_pre": np.stack(got["pre"], 1), "lm.attn_out": np.stack(got["attn"], 1),
           "lm.mlp_out": np.stack(got["mlp"], 1), "lm.resid_post": np.stack(got["post"], 1),
           "lm.final": got["final"][0]}
    if got["block"]:
        res["vision.block_out"] = np.stack(got["block"], 1)
        res["vision.tokens"] = got["tokens"][0]
    return res


def random_image(h: int, w: int, mode: str = "RGB", seed: int = 0):
    """A PIL image of uniform random bytes in mode "RGB", "RGBA" or "L"."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


def hf_logits(hf, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The HF model's logits on numpy inputs, without hooks."""
    import torch

    with torch.no_grad():
        return hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}, use_cache=False).logits.numpy()


LM_SITES = ("lm.resid_pre", "lm.attn_out", "lm.mlp_out", "lm.resid_post", "lm.final")
VISION_SITES = ("vision.block_out", "vision.tokens")


def forward_sites(model, batch, images: bool) -> dict[str, np.ndarray]:
    """Our side of a parity run: sj.forward's logits and every LM site (and with images every
    vision site), as numpy."""
    import spatial_jax as sj

    out = sj.forward(model, batch, cache=LM_SITES + (VISION_SITES if images else ()))
    return {"logits": np.asarray(out.logits), **{k: np.asarray(v) for k, v in out.cache.items()}}


@contextlib.contextmanager
def without_video_processor():
    """transformers 5.23 needs torchvision to build Qwen2-VL's video processor (the
    `VideoProcessorMixin` class check and `AutoVideoProcessor` both need it); inside this context a
    processor loads with video_processor=None, which the image/text path never reads."""
    from transformers.models.auto import video_processing_auto
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def check_but_video(self, name, value):
        return None if name == "video_processor" and value is None else check(self, name, value)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", check_but_video)
        mp.setattr(video_processing_auto.AutoVideoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: None))
        yield


def param_counts(model_cls, cfg, hf_cls, hf_cfg) -> tuple[int, int]:
    """Parameter counts of our model and of transformers' at a (real-size) config, neither
    allocated: ours through nnx.eval_shape, HF's on the meta device."""
    import jax
    import torch
    from flax import nnx

    abstract = nnx.eval_shape(lambda: model_cls(cfg, dtype=jax.numpy.bfloat16, rngs=nnx.Rngs(0)))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
    with torch.device("meta"):
        n_hf = sum(p.numel() for p in hf_cls(hf_cfg).parameters())
    return n_ours, n_hf


def check_processor_outputs(ours: dict, ref: dict, int_keys: Sequence[str], image_keys: Sequence[str] = ()) -> float:
    """Checks our processor's output against HF's: exactly int_keys, "pixel_values" and
    image_keys; int_keys int32 and equal; without images pixel_values and image_keys None (and no
    pixel_values in HF's), with images image_keys equal and pixel_values float32 of HF's shape.
    Returns the largest pixel_values difference (0.0 without images)."""
    assert set(ours) == {*int_keys, "pixel_values", *image_keys}
    for key in int_keys:
        assert ours[key].dtype == np.int32
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    if ours["pixel_values"] is None:
        assert "pixel_values" not in ref and all(ours[key] is None for key in image_keys)
        return 0.0
    for key in image_keys:
        np.testing.assert_array_equal(ours[key], ref[key])
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    return float(np.abs(ours["pixel_values"] - ref["pixel_values"]).max())


# ----------------------------------------------------------------------------------------------
# Checks the Llava families' tests share (Pixtral, LLaVA-1.5)


def assert_logits_match(case: str, inputs: dict, ours: dict, ref: dict, vocab: int, tol: float) -> None:
    """Our float32 logits [B, T, vocab] equal HF's within tol at every position; HF's not degenerate
    (some logit > 1, so the tolerance means something). Prints the figures of the case."""
    assert ours["logits"].dtype == np.float32
    assert ours["logits"].shape == ref["logits"].shape == (*inputs["input_ids"].shape, vocab)
    assert np.abs(ref["logits"]).max() > 1.0
    sites_err = max(np.abs(ours[k] - ref[k]).max() for k in ours if k != "logits")
    print(f"{case}: logits max abs diff {np.abs(ours['logits'] - ref['logits']).max():.2g} (largest logit "
          f"{np.abs(ref['logits']).max():.2g}), sites {sites_err:.2g}")
    np.testing.assert_allclose(ours["logits"], ref["logits"], rtol=0, atol=tol)


def swap_columns_index(ids: np.ndarray, image_token: int, grid: tuple[int, int]) -> np.ndarray:
    """[B, T] replace index swapping each row's image's left and right patch columns (one image a
    row, `grid` (rows, cols) of `image_token` slots)."""
    import spatial_jax as sj

    def columns(row):
        cells = np.flatnonzero(row == image_token).reshape(grid)
        return cells[:, 0], cells[:, -1]
    return np.stack([sj.swap_index(ids.shape[1], [columns(row)]) for row in ids])


def check_criss_cross_and_amplify(model, hf, clean: dict, cf: dict, to_batch: Callable, run_hf: Callable,
                                  index: np.ndarray, image_token: int, tol: float, layer: int = 2,
                                  where: np.ndarray | None = None) -> None:
    """Left <-> right image columns (`index`) swapped in lm.resid_pre of `layer` with the
    counterfactual's activations, after amplifying the visual tokens at lm.resid_pre of layer 0:
    our engine equals the same patches as forward hooks on HF's model (run_hf(hf, inputs, hooks)),
    and the patches change HF's output. where: [B, T] bool, the positions compared (default all)."""
    import torch

    import spatial_jax as sj

    src = np.asarray(sj.forward(model, to_batch(cf), cache=("lm.resid_pre",)).cache["lm.resid_pre"][:, layer])
    W_dir = np.random.default_rng(0).standard_normal((model.config.hidden_size, 2)).astype(np.float32)
    at = clean["input_ids"] == image_token
    ivs = [sj.Intervention(site="lm.resid_pre", op="amplify", layer=0, directions=W_dir, alpha=4.0,
                           index=sj.mask_index(at)),
           sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, source=src, index=index)]
    ours = np.asarray(sj.forward(model, to_batch(clean), interventions=ivs).logits)

    Wt, sel = torch.tensor(W_dir), torch.tensor(at)

    def amplify(h):  # the official coco_amplification hook
        coeff = (h @ Wt) / ((Wt * Wt).sum(0) + 1e-8)
        return torch.where(sel[..., None], h + 4.0 * coeff @ Wt.T, h)

    layers = hf.model.language_model.layers
    ref = run_hf(hf, clean, hooks=[(layers[0], "pre", amplify),
                                   (layers[layer], "pre", torch_replace(index, src))])["logits"]
    assert np.abs(ref - run_hf(hf, clean)["logits"]).max() > 0.1  # the patches change the output
    where = np.ones(ours.shape[:2], bool) if where is None else where
    np.testing.assert_allclose(ours[where], ref[where], rtol=0, atol=tol)


def check_sweep_equals_one_forward_per_layer(model, clean, cf, index: np.ndarray, tokens: np.ndarray) -> None:
    """A criss-cross sweep (`index`) at lm.resid_pre over every layer (one vmapped call per chunk,
    restarting the LM at the patched layer) equals a full forward per layer. clean, cf: Batches."""
    import spatial_jax as sj

    site, L = "lm.resid_pre", model.config.num_layers
    src = np.asarray(sj.forward(model, cf, cache=(site,)).cache[site])  # [B, L, T, D]
    readout = sj.Readout(position=sj.last_positions(clean.attention_mask), tokens=tokens)
    iv = sj.Intervention(site=site, op="replace", layer=np.arange(L), index=np.broadcast_to(index, (L,) + index.shape),
                         source=np.moveaxis(src, 1, 0))
    res = sj.patch_sweep(model, clean, [iv], readout, chunk_size=2)
    for layer in range(L):
        one = sj.Intervention(site=site, op="replace", layer=layer, index=index, source=src[:, layer])
        logits = np.asarray(sj.forward(model, clean, interventions=[one]).logits)[:, -1]
        np.testing.assert_allclose(res.logits[layer], logits[:, tokens], atol=1e-5)
        np.testing.assert_array_equal(res.argmax[layer], logits.argmax(-1))


def torch_replace(index: np.ndarray, source: np.ndarray):
    """The hook-side `replace`: h [B, T, D] -> h with h[b, t] = source[b, index[b, t]] where index >= 0."""
    import torch

    src, sel, source = torch.tensor(np.maximum(index, 0)), torch.tensor(index >= 0), torch.tensor(np.asarray(source))

    def fn(h):
        gathered = torch.gather(source, 1, src[..., None].expand(-1, -1, h.shape[-1]))
        return torch.where(sel[..., None], gathered, h)
    return fn


HEAD_SITES = ("lm.attn_q", "lm.attn_k", "lm.attn_v", "lm.attn_z")


def hf_head_run(hf, inputs: dict[str, np.ndarray], hooks=()) -> dict[str, np.ndarray]:
    """A HF vision-language model's run (eager attention) with every LM layer's head sites in our
    layout, float32 numpy: lm.attn_q/k/v [B, L, T, H, hd] from forward hooks on self_attn's
    q_proj/k_proj/v_proj outputs, lm.attn_z [B, L, T, H, hd] from a forward pre-hook on o_proj
    (its input), lm.attn_pattern [B, L, H, T, T] from output_attentions, and "logits" [B, T, V].
    hooks: as hf_run's (installed first, so the recorded sites see what they change)."""
    import torch

    got: dict[str, list] = {site: [] for site in HEAD_SITES}

    def keep(site, head_dim, pre):
        def hook(_module, args, out=None):
            a = (args[0] if pre else out).detach().float().numpy().copy()
            got[site].append(a.reshape(a.shape[:2] + (-1, head_dim)))
        return hook

    handles = install_hooks(hooks)
    for layer in hf.model.language_model.layers:
        attn, hd = layer.self_attn, layer.self_attn.head_dim
        handles += [attn.q_proj.register_forward_hook(keep("lm.attn_q", hd, False)),
                    attn.k_proj.register_forward_hook(keep("lm.attn_k", hd, False)),
                    attn.v_proj.register_forward_hook(keep("lm.attn_v", hd, False)),
                    attn.o_proj.register_forward_pre_hook(keep("lm.attn_z", hd, True))]
    kw = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    if "pixel_values" in kw:
        kw["pixel_values"] = kw["pixel_values"].to(hf.dtype)
    try:
        with torch.no_grad():
            out = hf(**kw, output_attentions=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {"logits": out.logits.float().numpy(), **{site: np.stack(a, 1) for site, a in got.items()},
            "lm.attn_pattern": np.stack([a.float().numpy() for a in out.attentions], 1)}
