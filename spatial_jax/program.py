"""The start and end of every command-line program (the experiment binaries, spatial-jax-convert):
`run(main, wrote=...)` in place of `absl.app.run(main)`.

What a user sees, the same in every program:
  * `--help` (-h, --helpshort): the program's summary, its own flags (not the ~100 of absl
    logging and Orbax, which `--helpfull` still lists) and, last, an example command;
  * a bad flag value: one line naming the flag, exit 2, before any model is loaded (the flags'
    validators run at parse time);
  * a user error while running (ValueError, OSError: a missing file, a gated hub repo, ...): one
    line, exit 1; `--verbosity=1` shows the traceback. Ctrl-C: one line, exit 130;
  * on a failure the run's output dir is removed if the run created it and left it empty;
  * success ends with one line `wrote <path>`;
  * Orbax's and jax's INFO logs (checkpointer and handler reprs, backend probing) are dropped.

This module defines no flags and has no side effects on import.
"""
from __future__ import annotations

import logging as py_logging
import os
import shutil
import signal
import sys
import textwrap
from typing import Any, Callable, Optional, Sequence

from absl import app, flags
from absl import logging

FLAGS = flags.FLAGS
HELP_ARGS = ("--help", "-h", "--helpshort", "-?")
_OWN_MODULE_PREFIXES = ("experiments", "spatial_jax", "__main__", "benchmarks")


def _program() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return spec.name.rsplit(".", 1)[-1]
    return os.path.basename(sys.argv[0]).removesuffix(".py")


def _example_from_doc(doc: str) -> Optional[str]:
    """The first command line of a docstring (`python -m ...` or `spatial-jax-...`), with its
    backslash continuations joined."""
    lines = [line.strip() for line in doc.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith(("python -m ", "spatial-jax-")):
            parts = [line]
            while parts[-1].endswith("\\") and i + 1 < len(lines):
                i += 1
                parts[-1] = parts[-1][:-1].rstrip()
                parts.append(lines[i])
            return " ".join(" ".join(parts).split())
    return None


def own_flags() -> list:
    """The flags this program defined (its modules, experiments.*, spatial_jax.*), by name."""
    own = {}
    for module, module_flags in FLAGS.flags_by_module_dict().items():
        if module.startswith(_OWN_MODULE_PREFIXES) or module == sys.argv[0]:
            for flag in module_flags:
                own[flag.name] = flag
    return [own[name] for name in sorted(own)]


def help_text(doc: str, example: str) -> str:
    summary = textwrap.dedent(doc or "").strip().split("\n\n")[0]
    lines = [summary, "", "Flags:"]
    for flag in own_flags():
        text = f"--{flag.name}: {flag.help}"
        if flag.default is not None:
            value = ",".join(map(str, flag.default)) if isinstance(flag.default, list) else str(flag.default)
            text += f" (default: {value or repr('')})"
        lines.append(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="      "))
    lines += ["", "(--helpfull lists every flag, absl logging's included.)", "", "Example:", f"  {example}"]
    return "\n".join(lines)


class _DropLibraryInfo(py_logging.Filter):
    """Orbax logs each checkpointer, handler and restore step (with their reprs) at INFO through
    absl's logger, and jax its backend probing ("Unable to initialize backend 'tpu'"): dropped, so
    the log holds the program's own lines. Their warnings and errors still show."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or not any(
            f"{os.sep}{package}{os.sep}" in record.pathname for package in ("orbax", "jax"))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _remove_if_empty(path: str) -> None:
    """Removes `path` if it holds nothing but (nested) empty directories."""
    if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
        shutil.rmtree(path, ignore_errors=True)


_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    signal.default_int_handler(signum, frame)


def _unraisable(hook):
    """sys.unraisablehook that stays quiet about a KeyboardInterrupt dropped in a gc callback (the
    flag above re-raises it at the next check) and passes everything else to `hook`."""
    def quiet(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)
    return quiet


def check_interrupted() -> None:
    """Raises KeyboardInterrupt if Ctrl-C came earlier: Python drops a KeyboardInterrupt raised inside a
    garbage-collection callback (XLA runs one), so long loops call this between their steps."""
    if _interrupted:
        raise KeyboardInterrupt


def run(main: Callable[[Sequence[str]], Any], *, wrote: Optional[Callable[[], str]] = None,
        example: Optional[str] = None, doc: Optional[str] = None, argv: Optional[Sequence[str]] = None) -> None:
    """absl.app.run(main) with the behaviour in the module docstring.

    wrote() -> the path the program wrote (called after main returns; printed as `wrote <path>`).
    example: the example command of --help; default: the first command in `doc`.
    doc: the program's description (default: __main__'s docstring).
    """
    argv = list(sys.argv if argv is None else argv)
    name = _program()
    doc = doc if doc is not None else getattr(sys.modules.get("__main__"), "__doc__", None) or ""
    if any(arg in HELP_ARGS for arg in argv[1:]):
        example = example or _example_from_doc(doc) or f"{name} --helpfull"
        print(help_text(doc, example))
        sys.exit(0)

    def parse(args):
        try:
            return FLAGS(args)
        except flags.Error as e:
            print(f"{name}: error: {_one_line(e)} (--help lists the flags)", file=sys.stderr)
            sys.exit(2)

    def wrapped(args):
        logging.get_absl_handler().addFilter(_DropLibraryInfo())  # every record, absl's or propagated
        out_dir = FLAGS["output_dir"].value if "output_dir" in FLAGS else None
        existed = out_dir is None or os.path.exists(out_dir)
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _unraisable(sys.unraisablehook)
        try:
            main(args)
        except BaseException as e:
            if not existed:
                _remove_if_empty(out_dir)
            if isinstance(e, KeyboardInterrupt):
                kept = out_dir is not None and os.path.isdir(out_dir)
                sys.stdout.flush()
                print(f"{name}: interrupted" + (f"; finished parts are kept in {out_dir} (rerun to resume)"
                                                if kept else ""), file=sys.stderr)
                os._exit(130)  # now: no second traceback from threads or atexit handlers torn down mid-run
            if isinstance(e, (ValueError, OSError)) and FLAGS["verbosity"].value < 1:
                print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
                sys.exit(1)
            raise
        if wrote is not None:
            print(f"wrote {os.path.abspath(wrote())}")

    app.run(wrapped, argv=argv, flags_parser=parse)
