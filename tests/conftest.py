"""Shared test set-up.

docs/design.md, "Scale": tests simulate 8 devices on the CPU. XLA reads the flag when jax initializes its
backends, so it is set here, before any test module imports jax.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
# LLVM's optimization of XLA:CPU's generated code is about half of the CPU time of a compile, and
# compiling is most of the suite's time: the tests check what a program computes, not how fast it
# runs. The level is LLVM's: XLA's HLO passes (what tests/test_bf16_compute.py reads) and the
# floating-point semantics (no fast-math, no reassociation) are the same at every level. Subprocesses
# inherit it with the environment.
_OPT = "--xla_backend_optimization_level=0"
if _OPT.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _OPT

# Compiling dominates the suite's time (XLA:CPU takes 1-2 s of CPU per tiny-model forward or sweep),
# and the same programs are compiled again and again: in each test module (the fixture below clears
# the in-memory caches) and in each binary run as a subprocess. jax's persistent compilation cache
# keeps every executable of this session on disk, in a directory of its own that is removed at the
# end: nothing is shared with another session or left in the user's home. Set here, before jax is
# imported, and through the environment, so subprocesses use it too; the session's first process
# owns the directory.
_CACHE_OWNER = "SPATIAL_JAX_TEST_XLA_CACHE_OWNER"
if _CACHE_OWNER not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="spatial_jax_test_xla_cache_")
    os.environ.update({_CACHE_OWNER: str(os.getpid()), "JAX_COMPILATION_CACHE_DIR": _cache_dir,
                       # only programs worth keeping: jax's default (1 s) would skip most of them
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1"})
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import pytest  # noqa: E402

import fixtures_qwen2_vl as fq  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_compile_caches():
    """Each test module leaves no compiled programs behind: the whole suite runs in one process,
    and thousands of XLA:CPU executables, each with its own code mappings, pile up (vm.max_map_count
    is 65530 here; a fresh-clone `make test` aborted inside an XLA compile after ~700 tests)."""
    yield
    import jax

    jax.clear_caches()


class Qwen2VLCheckpoints:
    """Tiny HF Qwen2-VL checkpoints, each built once per session on first use.

    Kinds: "untied" (7B style), "tied" (2B style, tied embeddings), "processor" (untied, with a
    word-level tokenizer/processor and its special token ids; needs spatial_jax.processing).
    hf_dir(kind): the save_pretrained dir; hf_model(kind): the transformers model loaded from it
    (eager attention); model(kind): `sj.load` of it (float32). `tied` may be given as a bool.
    """

    _SEEDS = {"untied": 0, "tied": 1, "processor": 2}

    def __init__(self, root):
        self._root = root
        self._dirs: dict = {}
        self._hf: dict = {}
        self._sj: dict = {}

    @staticmethod
    def _kind(kind) -> str:
        return {False: "untied", True: "tied"}.get(kind, kind) if isinstance(kind, bool) else kind

    def hf_dir(self, kind="untied") -> str:
        kind = self._kind(kind)
        if kind not in self._dirs:
            self._dirs[kind] = fq.build_tiny_qwen2_vl(
                str(self._root / f"qwen2_vl_{kind}"), tie_word_embeddings=kind == "tied",
                seed=self._SEEDS[kind], processor=kind == "processor")
        return self._dirs[kind]

    def hf_model(self, kind="untied"):
        kind = self._kind(kind)
        if kind not in self._hf:
            self._hf[kind] = fq.load_hf(self.hf_dir(kind))
        return self._hf[kind]

    def model(self, kind="untied"):
        kind = self._kind(kind)
        if kind not in self._sj:
            import spatial_jax as sj

            self._sj[kind] = sj.load(self.hf_dir(kind))
        return self._sj[kind]


@pytest.fixture(scope="session")
def qwen2_vl_ckpts(tmp_path_factory) -> Qwen2VLCheckpoints:
    return Qwen2VLCheckpoints(tmp_path_factory.mktemp("qwen2_vl_ckpts"))


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(qwen2_vl_ckpts) -> str:
    """A tiny random HF Qwen2-VL dir with an untied lm_head (7B style)."""
    return qwen2_vl_ckpts.hf_dir("untied")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_tied_dir(qwen2_vl_ckpts) -> str:
    """A tiny random HF Qwen2-VL dir with tied embeddings (2B style)."""
    return qwen2_vl_ckpts.hf_dir("tied")


@pytest.fixture(scope="session")
def tiny_qwen2_vl_processor_dir(qwen2_vl_ckpts) -> str:
    """A tiny random HF Qwen2-VL dir with tokenizer, chat template and preprocessor config
    (word-level; special ids vision_start 3, vision_end 4, image_pad 6)."""
    pytest.importorskip("spatial_jax.families.qwen2_vl.word_tokenizer")
    return qwen2_vl_ckpts.hf_dir("processor")
