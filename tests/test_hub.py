"""Hub ids (`org/name[@revision]`) in `sj.load`, `spatial-jax-convert --hf_dir` and the binaries'
`--checkpoint`, resolved offline (HF_HUB_OFFLINE=1, HF_HOME a tmp dir) from a cache the test
writes in the hub's on-disk layout; and the one-line errors for gated, missing and uncached repos.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from experiments.random_checkpoint import write_random_checkpoint
from spatial_jax.convert import hub

REPO = "tiny-org/tiny-vlm"
SHA_MAIN, SHA_V1 = "a" * 40, "b" * 40
CONVERT = os.path.join(os.path.dirname(sys.executable), "spatial-jax-convert")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout, not the installed one


def _write_snapshot(cache: str, repo: str, sha: str, src_dir: str, refs: tuple[str, ...]) -> str:
    """Puts the files of `src_dir` into the hub cache as huggingface_hub lays it out:
    models--org--name/blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<name>."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", sha)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(snap)
    for name in os.listdir(src_dir):
        with open(os.path.join(src_dir, name), "rb") as f:
            data = f.read()
        blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(root, "refs", ref), "w") as f:
            f.write(sha)
    return snap


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME with REPO cached at two commits: main (2 layers) and tag v1 (3 layers)."""
    home = tmp_path_factory.mktemp("hf_home")
    src = tmp_path_factory.mktemp("src")
    _write_snapshot(str(home / "hub"), REPO, SHA_MAIN, write_random_checkpoint(str(src / "main"), layers=2), ("main",))
    _write_snapshot(str(home / "hub"), REPO, SHA_V1, write_random_checkpoint(str(src / "v1"), layers=3), ("v1",))
    return str(home)


def _offline_env(hf_home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}


LOADS = textwrap.dedent("""
    import json, os, sys
    import spatial_jax as sj
    from experiments import common
    out = {}
    for name in sys.argv[1:]:
        try:
            m = sj.load(name)
            out[name] = {"path": m.path, "layers": m.config.num_layers}
        except Exception as e:
            out[name] = {"error": type(e).__name__, "message": str(e)}
    common.FLAGS(["x", "--checkpoint=" + sys.argv[1]])
    model, _ = common.load_model()            # the binaries' --checkpoint
    out["--checkpoint"] = {"path": model.path, "layers": model.config.num_layers}
    print(json.dumps(out))
""")


def test_hub_ids_load_offline_from_the_cache(hf_home, tmp_path):
    local = tmp_path / "cwd"
    write_random_checkpoint(str(local / REPO), layers=1)  # a local dir spelled like the hub id
    names = [REPO, f"{REPO}@v1", f"{REPO}@{SHA_V1}", f"{REPO}@main", "tiny-org/not-cached",
             f"{REPO}@v9"]
    run = subprocess.run([sys.executable, "-c", LOADS, *names], capture_output=True, text=True,
                         env=_offline_env(hf_home), cwd=str(tmp_path), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    snap = os.path.join(hf_home, "hub", "models--tiny-org--tiny-vlm", "snapshots")
    assert got[REPO] == {"path": os.path.join(snap, SHA_MAIN), "layers": 2}
    assert got[f"{REPO}@main"] == got[REPO]
    assert got[f"{REPO}@v1"] == {"path": os.path.join(snap, SHA_V1), "layers": 3}
    assert got[f"{REPO}@{SHA_V1}"] == got[f"{REPO}@v1"]
    assert got["--checkpoint"] == got[REPO]
    for bad in ("tiny-org/not-cached", f"{REPO}@v9"):
        err = got[bad]
        assert err["error"] == "HubError" and "\n" not in err["message"]
        assert err["message"].startswith(f"{bad}: ") and "HF_HUB_OFFLINE" in err["message"], err

    # a local path that exists wins over the hub id it also spells
    run = subprocess.run([sys.executable, "-c", LOADS, REPO], capture_output=True, text=True,
                         env=_offline_env(hf_home), cwd=str(local), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got[REPO] == {"path": REPO, "layers": 1}


def test_convert_cli_takes_a_hub_id(hf_home, tmp_path):
    env = _offline_env(hf_home)
    ok = subprocess.run([CONVERT, f"--hf_dir={REPO}@v1", f"--output_dir={tmp_path / 'out'}"], capture_output=True,
                        text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["text_config"]["num_hidden_layers"] == 3
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
    bad = subprocess.run([CONVERT, "--hf_dir=tiny-org/absent", f"--output_dir={tmp_path / 'bad'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and not os.path.exists(tmp_path / "bad")
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny-org/absent" in lines[0] and "HF_HUB_OFFLINE" in lines[0], bad.stderr


def _hub_exception(name: str):
    """An instance of huggingface_hub.errors.<name> without an HTTP response behind it."""
    from huggingface_hub import errors
    cls = getattr(errors, name)
    e = cls.__new__(cls)
    Exception.__init__(e, f"fake {name}")
    return e


@pytest.mark.parametrize("error,expect", [("GatedRepoError", "gated"), ("RepositoryNotFoundError", "no such repo"),
                                          ("RevisionNotFoundError", "no revision 'v2'")])
def test_hub_errors_are_one_line(monkeypatch, error, expect):
    import huggingface_hub

    def fake(*args, **kwargs):
        raise _hub_exception(error)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(hub.HubError) as info:
        hub.resolve("google/gemma-3-4b-it@v2")
    message = str(info.value)
    assert message.startswith("google/gemma-3-4b-it@v2: ") and expect in message and "\n" not in message


def test_only_safetensors_json_tokenizer_and_templates_are_fetched(monkeypatch, tmp_path):
    import huggingface_hub
    calls = []

    def fake(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub.resolve("Qwen/Qwen2-VL-7B-Instruct") == str(tmp_path)
    assert hub.resolve("mistral-community/pixtral-12b@abc123") == str(tmp_path)
    (repo, rev, patterns), (repo2, rev2, _) = calls
    assert (repo, rev, repo2, rev2) == ("Qwen/Qwen2-VL-7B-Instruct", None, "mistral-community/pixtral-12b", "abc123")
    hub_files = ["config.json", "generation_config.json", "model-00001-of-00005.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja",
                 "preprocessor_config.json", "processor_config.json", "special_tokens_map.json",
                 "pytorch_model-00001-of-00002.bin", "pytorch_model.bin", "README.md", "consolidated.pth",
                 "original/params.bin"]
    fetched = {f for f in hub_files if any(fnmatch.fnmatch(f, p) for p in patterns)}
    assert not any(f.endswith((".bin", ".pth", ".md")) for f in fetched)
    assert fetched >= set(hub_files[:14])


@pytest.mark.parametrize("text,is_id", [("Qwen/Qwen2-VL-7B-Instruct", True), ("google/gemma-3-4b-it@main", True),
                                        ("mistral-community/pixtral-12b@0123abcd", True), ("/abs/dir", False),
                                        ("./rel/dir", False), ("a/b/c", False), ("plain", False)])
def test_what_counts_as_a_hub_id(text, is_id, tmp_path):
    assert hub.is_hub_id(text) == is_id
    if not is_id:  # anything else reaches the caller's "no such directory" unchanged
        assert hub.resolve(text) == text
