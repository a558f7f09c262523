"""spatial-jax-convert, run as a subprocess: round trips and bad input.

Every conversion of this module is launched at once by one module-scoped fixture (each
subprocess spends most of its ~2 s importing jax, so they overlap well); the tests then check
one result each.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import fixtures_qwen2_vl as fq
import spatial_jax as sj
from spatial_jax.convert.checkpoint import write_converted
from spatial_jax.convert.convert import convert_hf

BIN_DIR = os.path.dirname(sys.executable)
CONSOLE_SCRIPT = os.path.join(BIN_DIR, "spatial-jax-convert")
MAX_PARALLEL = 6


def _rewrite(src: str, dst: str, edit) -> str:
    """Copies HF dir `src` to `dst`, passing its tensors through edit(dict) -> dict."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return dst


def _runtime_names(tensors: dict) -> dict:
    """Hub/save_pretrained names -> transformers 5.x module (state_dict) names."""
    out = {}
    for k, v in tensors.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        out[k] = v
    return out


def _sources(root: str, base: str, tied: str) -> dict[str, str]:
    """name -> HF dir to convert; each bad one has exactly one problem."""
    s = {"fp32": base, "bf16": base, "tied": tied}
    s["sharded"] = fq.build_tiny_qwen2_vl(os.path.join(root, "sharded"), max_shard_size="100KB")
    s["runtime_names"] = _rewrite(base, os.path.join(root, "runtime_names"), _runtime_names)
    s["bf16_source"] = _rewrite(base, os.path.join(root, "bf16_source"),
                                lambda t: {k: v.astype(jnp.bfloat16) for k, v in t.items()})

    s["missing_shard"] = shutil.copytree(s["sharded"], os.path.join(root, "missing_shard"))
    with open(os.path.join(s["missing_shard"], "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(s["missing_shard"], shard))

    s["truncated"] = shutil.copytree(base, os.path.join(root, "truncated"))
    path = os.path.join(s["truncated"], "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 1000)

    def wrong_shape(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"].T.copy()
        return t

    def int_dtype(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
        return t

    def missing_tensor(t):  # one layer of a stacked weight: every layer's tensor is looked for
        del t["model.layers.1.mlp.up_proj.weight"]
        return t

    def extra_tensor(t):
        t["model.layers.1.mlp.extra_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"].copy()
        return t

    s["missing_tensor"] = _rewrite(base, os.path.join(root, "missing_tensor"), missing_tensor)
    s["extra_tensor"] = _rewrite(base, os.path.join(root, "extra_tensor"), extra_tensor)
    s["wrong_shape"] = _rewrite(base, os.path.join(root, "wrong_shape"), wrong_shape)
    s["int_dtype"] = _rewrite(base, os.path.join(root, "int_dtype"), int_dtype)

    s["unknown_arch"] = shutil.copytree(base, os.path.join(root, "unknown_arch"))
    cfg_path = os.path.join(s["unknown_arch"], "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(architectures=["FooBarForCausalLM"], model_type="foo_bar")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)

    s["pickle_only"] = os.path.join(root, "pickle_only")
    os.makedirs(s["pickle_only"])
    shutil.copy(os.path.join(base, "config.json"), s["pickle_only"])
    with open(os.path.join(s["pickle_only"], "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04 not a pickle, never to be unpickled " * 20)

    s["missing_config"] = shutil.copytree(base, os.path.join(root, "missing_config"))
    os.remove(os.path.join(s["missing_config"], "config.json"))

    s["nonexistent"] = os.path.join(root, "does_not_exist")
    s["out_nonempty"] = base
    return s


OK = ("fp32", "bf16", "tied", "sharded", "runtime_names", "bf16_source")
# bad case -> regex that the one stderr line must match (the problem, named)
BAD = {
    "missing_shard": r"missing shard",
    "truncated": r"model\.safetensors: truncated",
    "missing_tensor": r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight",
    "extra_tensor": r"not in the qwen2_vl key map.*model\.layers\.1\.mlp\.extra_proj\.weight",
    "wrong_shape": r"model\.layers\.1\.self_attn\.k_proj\.weight has shape",
    "int_dtype": r"model\.norm\.weight has dtype int32",
    "unknown_arch": r"unknown architecture.*FooBarForCausalLM",
    "pickle_only": r"pytorch_model\.bin.*never unpickled",
    "missing_config": r"missing config\.json",
    "nonexistent": r"does_not_exist: no such directory",
    "out_nonempty": r"not empty",
}


@pytest.fixture(scope="module")
def cli(qwen2_vl_ckpts, tmp_path_factory):
    """Runs every conversion (in parallel); name -> dict(rc, stderr, out, parent, seconds)."""
    root = str(tmp_path_factory.mktemp("convert_cli"))
    sources = _sources(os.path.join(root, "src"), qwen2_vl_ckpts.hf_dir(False), qwen2_vl_ckpts.hf_dir(True))
    jobs = {}
    for name, hf_dir in sources.items():
        parent = os.path.join(root, "out", name)  # one parent per run: nothing else should land there
        os.makedirs(parent)
        out = os.path.join(parent, "converted")
        if name == "out_nonempty":
            os.makedirs(out)
            with open(os.path.join(out, "keep.txt"), "w") as f:
                f.write("mine")
        # the installed console script for one run, `python -m` for the rest
        exe = [CONSOLE_SCRIPT] if name == "fp32" else [sys.executable, "-m", "spatial_jax.convert.cli"]
        args = exe + ["--hf_dir", hf_dir, "--output_dir", out]
        if name == "bf16":
            args += ["--dtype", "bfloat16"]
        jobs[name] = dict(args=args, out=out, parent=parent)
    pending, running, results = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < MAX_PARALLEL:
            name = pending.pop(0)
            running[name] = (subprocess.Popen(jobs[name]["args"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True), time.time())
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                stdout, stderr = proc.communicate()
                results[name] = dict(jobs[name], rc=proc.returncode, stdout=stdout, stderr=stderr,
                                     seconds=time.time() - t0)
                del running[name]
        time.sleep(0.05)
    for name, r in results.items():  # visible with -s
        print(f"spatial-jax-convert {name:15s} rc={r['rc']} {r['seconds']:.1f}s")
    results["_sources"] = sources
    return results


def _logits(model, inputs):
    return np.asarray(sj.forward(model, fq.to_batch(inputs)).logits)


INPUTS = [[[5, 6], fq.image(4, 6), [7, 8, 9], fq.image(8, 4), [10, 11]]]


@pytest.mark.parametrize("name", OK)
def test_conversion_round_trip(cli, name):
    r = cli[name]
    assert r["rc"] == 0, r["stderr"][-3000:]
    assert r["stdout"].startswith("spatial-jax-convert: wrote ")
    assert sorted(os.listdir(r["parent"])) == ["converted"]  # no .partial- leftovers
    files = set(os.listdir(r["out"]))
    assert {"config.json", "spatial_jax.json", "params"} <= files
    assert not any(f.endswith((".safetensors", ".bin")) for f in files)
    dtype = "bfloat16" if name == "bf16" else "float32"
    with open(os.path.join(r["out"], "spatial_jax.json")) as f:
        assert json.load(f)["dtype"] == dtype
    converted = sj.load(r["out"])
    assert converted.dtype == dtype
    direct = sj.load(cli["_sources"][name], dtype=dtype)
    inputs = fq.make_inputs(INPUTS, seed=3)
    np.testing.assert_array_equal(_logits(converted, inputs), _logits(direct, inputs))
    if name in ("sharded", "runtime_names", "bf16_source"):
        # same weights as the plain checkpoint (bf16_source: rounded to bf16 first, which moves
        # the logits by 0.043 at most, of max |logit| 3.4)
        base = sj.load(cli["_sources"]["fp32"])
        atol = 0.1 if name == "bf16_source" else 0
        np.testing.assert_allclose(_logits(converted, inputs), _logits(base, inputs), rtol=0, atol=atol)


def test_sharded_source_has_shards(cli):
    files = os.listdir(cli["_sources"]["sharded"])
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2


def test_converted_dir_has_normal_permissions(cli):
    """Like any dir this user makes (0o777 & ~umask), not the 0o700 of a temp dir."""
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(cli["fp32"]["out"]).st_mode & 0o777 == 0o777 & ~mask


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_fails_cleanly(cli, name):
    r = cli[name]
    assert r["rc"] != 0
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1, r["stderr"]
    assert lines[0].startswith("spatial-jax-convert: error: ")
    assert __import__("re").search(BAD[name], lines[0]), lines[0]
    if name == "out_nonempty":  # the existing dir is left exactly as it was
        assert os.listdir(r["parent"]) == ["converted"]
        assert os.listdir(r["out"]) == ["keep.txt"]
    else:
        assert os.listdir(r["parent"]) == []  # no output dir, no .partial- temp dir


def test_console_script_is_installed():
    eps = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "spatial-jax-convert" and ep.value == "spatial_jax.convert.cli:run" for ep in eps)
    assert os.access(CONSOLE_SCRIPT, os.X_OK)




def test_converted_dir_not_matching_its_config_fails_cleanly(tiny_qwen2_vl_dir, tmp_path):
    """The leaf-by-leaf restore reads the stored shapes: a config that builds other shapes is
    one error naming the parameter, not a model with wrong-shaped weights."""
    bad = str(tmp_path / "bad")
    family, _, _, params = convert_hf(tiny_qwen2_vl_dir, "float32")
    write_converted(bad, tiny_qwen2_vl_dir, family.name, "float32", params)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    text = cfg.get("text_config", cfg)
    text["intermediate_size"] += 8
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"stored parameter \S+ is \(\d+, \d+, \d+\) float32, the config's model "
                                         r"needs \(\d+, \d+, \d+\) float32"):
        sj.load(bad)
