"""spatial-jax-convert: HF safetensors checkpoint (a local dir or a hub id) -> converted Orbax checkpoint dir.

  spatial-jax-convert --hf_dir DIR_OR_HUB_ID --output_dir DIR [--dtype float32|bfloat16]

Exits 0 on success. On bad input it prints one line naming the problem, exits 1, and leaves no
output directory behind.
"""
from __future__ import annotations

import sys

from absl import flags, logging

from spatial_jax import program
from spatial_jax.convert.checkpoint import check_output_dir, write_converted
from spatial_jax.convert.convert import DTYPES, convert_hf
from spatial_jax.convert.hub import resolve
from spatial_jax.convert.safetensors_dir import CheckpointError

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "HF checkpoint dir (config.json + safetensors), or a hub id "
                    "org/name[@revision] (fetched into the HF cache; HF_HOME, HF_TOKEN, HF_HUB_OFFLINE apply).")
flags.DEFINE_string("output_dir", None, "Where the converted checkpoint goes (must not exist).")
flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "Parameter dtype of the converted checkpoint.")
flags.mark_flags_as_required(["hf_dir", "output_dir"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        # stderr carries only the one-line error (libraries log INFO lines there otherwise);
        # --verbosity=0 shows the progress logs.
        logging.set_verbosity(logging.WARNING)
    try:
        check_output_dir(FLAGS.output_dir)  # before the (long) conversion
        hf_dir = resolve(FLAGS.hf_dir)
        family, _, _, params = convert_hf(hf_dir, FLAGS.dtype)
        write_converted(FLAGS.output_dir, hf_dir, family.name, FLAGS.dtype, params)
    except (CheckpointError, OSError) as e:  # OSError includes FileExistsError
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 -- the contract is one line, never a traceback
        _fail(f"unexpected {type(e).__name__}: {e}")
    print(f"spatial-jax-convert: wrote {FLAGS.output_dir} ({family.name}, {FLAGS.dtype})")


def _fail(message: str) -> None:
    print(f"spatial-jax-convert: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(1)


def run():
    program.run(main, doc=__doc__, example="spatial-jax-convert --hf_dir Qwen/Qwen2-VL-7B-Instruct "
                "--output_dir checkpoints/qwen2-vl-7b --dtype bfloat16")


if __name__ == "__main__":
    run()
