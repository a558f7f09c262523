"""How reproducible float32 Gemma 3 logits are on one device, next to what sharding changes.

    python benchmarks/float32_noise_gemma3.py

The tiny random Gemma 3 of the tests (tests/fixtures_gemma3.py; logits up to ~32) on the four
prompts of tests/test_parallel_gemma3.py, float32 throughout. Prints the max abs logit
difference between: the batch of four and each prompt run alone (one device: only XLA's
grouping of the sums changes with the batch size); ours and HF eager; and sharded runs on 8
simulated CPU devices under several meshes and the single-device batch. A mesh with a model
axis splits the row-parallel matmuls' sums, a data-only mesh does not.
"""
from __future__ import annotations

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402

import fixtures_gemma3 as fg  # noqa: E402
import spatial_jax as sj  # noqa: E402
from spatial_jax import parallel  # noqa: E402

PROMPTS = [[[20, 21], fg.IMAGE, [22, 23]], [[24], fg.IMAGE, [25, 26, 27]],
           [[28, 29, 30], fg.IMAGE, [31]], [[32], fg.IMAGE, [33, 34]]]


def main():
    hf_dir = os.path.join(tempfile.mkdtemp(), "hf")
    fg.build_tiny_gemma3(hf_dir)
    single = sj.load(hf_dir)
    inputs = fg.make_inputs(PROMPTS, seed=0)
    ref = np.asarray(sj.forward(single, fg.to_batch(inputs)).logits)
    print(f"max |logit|: {np.abs(ref).max():.1f}")
    alone = [np.asarray(sj.forward(single, fg.to_batch({k: v[i:i + 1] for k, v in inputs.items()})).logits)[0]
             for i in range(len(PROMPTS))]
    print(f"one device, batch of 4 vs each prompt alone: {np.abs(np.stack(alone) - ref).max():.3g}")
    hf = fg.hf_run(fg.load_hf(hf_dir), inputs)["logits"]
    print(f"ours vs HF eager (batch of 4): {np.abs(hf - ref).max():.3g}")
    for spec in ("data:8,model:1", "data:4,model:2", "data:2,model:4", "data:1,model:8"):
        got = parallel.to_host(sj.forward(sj.load(hf_dir, mesh=parallel.make_mesh(spec)), fg.to_batch(inputs)).logits)
        print(f"mesh {spec} vs one device: {np.abs(got - ref).max():.3g}")


if __name__ == "__main__":
    main()
