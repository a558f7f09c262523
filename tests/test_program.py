"""Library hygiene and the command-line programs' user path (issue 17.7), mostly as subprocesses:
importing the library registers no flags and uses no jax._src, docs the code cites exist, --help
lists a program's own flags and an example, bad flags fail in one line before any model is
loaded, results follow the umask, success ends with `wrote <path>`, Ctrl-C ends in one line, and
slot axes stay legible at 36 layers."""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                  if "program.run(main" in open(p).read())
CONVERT = os.path.join(os.path.dirname(sys.executable), "spatial-jax-convert")


def _env(**extra) -> dict:
    # PYTHONPATH: this checkout's code, also for the console script (the venv may hold another)
    return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **extra}


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=kwargs.pop("cwd", ROOT),
                          timeout=kwargs.pop("timeout", 300), **kwargs)


def test_every_binary_uses_the_shared_wrapper():
    scripts = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
               if 'if __name__ == "__main__"' in open(p).read()]
    assert sorted(scripts) == BINARIES and len(BINARIES) >= 14


IMPORT_ALL = """
import importlib, pkgutil
from absl import flags
import spatial_jax
for m in pkgutil.walk_packages(spatial_jax.__path__, "spatial_jax."):
    if m.name != "spatial_jax.convert.cli":  # the console script: a binary, flags are its job
        importlib.import_module(m.name)
print(sorted(k for k in flags.FLAGS.flags_by_module_dict() if not k.startswith(("absl.", "orbax."))))
print(sorted(f.name for k, fs in flags.FLAGS.flags_by_module_dict().items() if k.startswith("orbax.") for f in fs))
"""


def test_importing_the_library_registers_no_flags():
    run = _run([sys.executable, "-c", IMPORT_ALL])
    assert run.returncode == 0, run.stderr[-2000:]
    modules, orbax = run.stdout.strip().splitlines()[-2:]
    assert modules == "[]", modules  # e.g. the old spatial_jax.parallel.flags defined --mesh here
    assert not {"mesh", "distributed", "checkpoint", "dataset", "hf_dir"} & set(eval(orbax))


def _sources(*dirs, ext=(".py",)):
    for d in dirs:
        for path in glob.glob(os.path.join(ROOT, d, "**", "*"), recursive=True):
            if path.endswith(ext):
                yield path


def test_no_private_jax_api_in_the_library_or_binaries():
    hits = [p for p in _sources("spatial_jax", "experiments") if re.search(r"jax\._src", open(p).read())]
    assert not hits


def test_documents_cited_by_the_code_exist():
    texts = list(_sources("spatial_jax", "experiments", "benchmarks", "tests", "docs", ext=(".py", ".md")))
    texts.append(os.path.join(ROOT, "README.md"))
    cited = set()
    for path in texts:
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue
        text = open(path).read()
        assert "DESIGN.md" not in text, f"{path} cites DESIGN.md, which is not in the repository"
        cited |= set(re.findall(r"\b(docs/[\w./-]+\.md)\b", text))
    assert "docs/design.md" in cited
    assert all(os.path.isfile(os.path.join(ROOT, doc)) for doc in cited), cited


HELP_CHECKED = {"behaviour": ["--checkpoint", "--dataset", "--output_dir", "--mesh"],
                "criss_cross": ["--checkpoint", "--n_pairs", "--golden"], "run_all": ["--only", "--checkpoint"],
                "demo": ["--output_dir", "--only"], "show_datasets": ["--geometry", "--output_dir"],
                "train_organism": ["--output_dir"], "spatial-jax-convert": ["--hf_dir", "--output_dir", "--dtype"]}


def test_help_lists_own_flags_and_ends_with_an_example():
    """Programs of each kind (experiments.common's flags, their own, spatial-jax-convert), all at
    once: each spends seconds importing jax."""
    commands = {name: [sys.executable, "-m", f"experiments.{name}", "--help"] for name in HELP_CHECKED}
    commands["spatial-jax-convert"] = [CONVERT, "--help"]
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                    cwd=ROOT) for name, cmd in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])
        lines = out.strip().splitlines()
        assert lines[-2] == "Example:", (name, out)
        command = "spatial-jax-convert " if name == "spatial-jax-convert" else f"python -m experiments.{name} "
        assert lines[-1].strip().startswith(command), (name, lines[-1])
        for flag in HELP_CHECKED[name]:
            assert f"\n  {flag}: " in out, (name, flag, out)
        for foreign in ("experimental_orbax", "logtostderr", "verbosity", "only_check_args"):
            assert foreign not in out, (name, foreign)


def test_every_binary_has_an_example_command():
    import ast

    from spatial_jax import program
    for name in BINARIES:  # read, not imported: show_datasets and experiments.common define the same flags
        source = open(os.path.join(ROOT, "experiments", f"{name}.py")).read()
        doc = ast.get_docstring(ast.parse(source)) or ""
        example = program._example_from_doc(doc) or re.search(r'example="([^"]+)"', source)[1]
        assert example.startswith(f"python -m experiments.{name} "), (name, example)


def test_bad_dataset_fails_in_one_line_before_loading(tmp_path):
    out = tmp_path / "out"
    run = _run([sys.executable, "-m", "experiments.criss_cross", "--dataset=squarez",
                "--checkpoint=/nonexistent/model", f"--output_dir={out}"])
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--dataset" in lines[0] and "squarez" in lines[0], run.stderr
    assert not out.exists()


def test_user_error_while_running_is_one_line_and_leaves_no_output_dir(tmp_path):
    out = tmp_path / "out"
    run = _run([sys.executable, "-m", "experiments.behaviour", "--checkpoint=/nonexistent/model",
                f"--output_dir={out}"])
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("behaviour: error: ") and "/nonexistent/model" in lines[0]
    assert not out.exists()


def test_success_ends_with_one_wrote_line(tmp_path):
    out = tmp_path / "ckpt"
    run = _run([sys.executable, "-m", "experiments.random_checkpoint", f"--output_dir={out}"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == f"wrote {out}"
    assert os.path.isfile(out / "config.json")


def test_results_follow_the_umask(tmp_path):
    from experiments import common
    old = os.umask(0o022)
    try:
        common.write_atomic(str(tmp_path / "results.json"), "{}")
        common.write_csv(str(tmp_path / "table.csv"), ["a"], [[1]])
        os.umask(0o077)
        common.write_atomic(str(tmp_path / "private.json"), "{}")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "results.json").st_mode & 0o777) == "0o644"
    assert oct(os.stat(tmp_path / "table.csv").st_mode & 0o777) == "0o644"
    assert oct(os.stat(tmp_path / "private.json").st_mode & 0o777) == "0o600"
    assert not glob.glob(str(tmp_path / ".tmp-*"))


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    from experiments.random_checkpoint import write_random_checkpoint
    return write_random_checkpoint(str(tmp_path_factory.mktemp("ckpt")), layers=2)


def test_ctrl_c_ends_in_one_line(random_ckpt, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "experiments.criss_cross", f"--checkpoint={random_ckpt}",
                             f"--output_dir={tmp_path}", "--nogolden", "--n_pairs=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    # wait until main runs (its first log line: the checkpoint converted in memory), then interrupt
    seen = ""
    deadline = time.time() + 240
    while "converted" not in seen and time.time() < deadline:
        seen += proc.stderr.readline()
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    after = err.strip().splitlines()
    assert after[-1].startswith("criss_cross: interrupted"), err[-2000:]
    assert not [line for line in after if "KeyboardInterrupt" in line]


def test_slot_labels_do_not_overlap_at_36_layers():
    from experiments import plotting
    from experiments.plotting import plt
    for n_slots in (29, 37, 41):
        fig, ax = plt.subplots(figsize=(3.6, 3.0))  # probe_lm's panel, the narrowest
        ax.plot(range(n_slots), range(n_slots))
        plotting.slot_axis(ax, n_slots)
        fig.tight_layout()
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert boxes[0] and ax.get_xticklabels()[0].get_text() == "emb"
        assert ax.get_xticklabels()[-1].get_text() == str(n_slots - 2)  # the last layer is labelled
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), n_slots
        assert set(ax.get_xticks()) | set(ax.get_xticks(minor=True)) == set(range(n_slots))  # a tick per slot
        plt.close(fig)
