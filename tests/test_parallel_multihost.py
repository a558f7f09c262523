"""Multi-host start-up: two processes x 4 CPU devices joined by `--distributed` into one
data:4,model:2 mesh restore the checkpoint, run a forward and a sweep, and get the single-device
results. Opt-in (about 25 s on 2 cores): SPATIAL_JAX_MULTIHOST_TEST=1 pytest tests/test_parallel_multihost.py
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("SPATIAL_JAX_MULTIHOST_TEST") != "1",
                                reason="opt-in: set SPATIAL_JAX_MULTIHOST_TEST=1")

WORKER = textwrap.dedent('''
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import numpy as np
    from absl import app
    from experiments import mesh_flags  # defines --mesh / --distributed (importing jax starts no backend)
    from spatial_jax import parallel

    def main(argv):
        mesh = mesh_flags.setup_from_flags()  # --distributed ... --mesh=data:4,model:2
        import jax
        import spatial_jax as sj
        assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
        ckpt, out = argv[1], argv[2]
        data = np.load(os.path.join(os.path.dirname(out), "inputs.npz"))
        batch = sj.Batch(input_ids=data["ids"], attention_mask=data["mask"], pixel_values=data["pv"],
                         image_grid_thw=data["grid"])
        model = sj.load(ckpt, mesh=mesh)
        for x in jax.tree.leaves(model.params):  # each process holds only its devices' shards
            assert not x.is_fully_addressable or x.sharding.is_fully_replicated
        logits = parallel.to_host(sj.forward(model, batch).logits)
        iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=data["layer"], index=data["index"],
                             source=data["source"])
        res = sj.patch_sweep(model, batch, [iv], sj.Readout(data["pos"], data["tokens"]), chunk_size=3)
        if jax.process_index() == 0:
            np.savez(out, logits=logits, sweep=res.logits, argmax=res.argmax)

    app.run(main)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_one_mesh(tiny_qwen2_vl_dir, tmp_path):
    import fixtures_qwen2_vl as fq
    import spatial_jax as sj
    from spatial_jax.convert.checkpoint import write_converted
    from spatial_jax.convert.convert import convert_hf

    ckpt = str(tmp_path / "converted")
    family, _, _, params = convert_hf(tiny_qwen2_vl_dir, "float32")
    write_converted(ckpt, tiny_qwen2_vl_dir, family.name, "float32", params)
    inputs = fq.make_inputs([[[5, 6], fq.image(4, 4), [7]], [[8], fq.image(4, 6), [9, 10]],
                             [[11, 12], fq.image(2, 4), [13]], [[14], fq.image(4, 4), [15, 16]]])
    batch = fq.to_batch(inputs)
    model = sj.load(ckpt)
    src = np.asarray(sj.forward(model, batch, cache=("lm.resid_pre",), logits=False).cache["lm.resid_pre"])
    B, L, T, D = src.shape
    layer = np.arange(L, dtype=np.int32)
    index = np.broadcast_to(np.where(np.asarray(batch.input_ids) == fq.IMAGE_PAD, np.arange(T), -1), (L, B, T))
    source = np.moveaxis(src[::-1], 1, 0)  # rows reversed: each row reads another row's activations
    data = dict(ids=inputs["input_ids"], mask=inputs["attention_mask"], pv=inputs["pixel_values"],
                grid=inputs["image_grid_thw"], layer=layer, index=np.ascontiguousarray(index, np.int32),
                source=np.ascontiguousarray(source), pos=sj.last_positions(inputs["attention_mask"]),
                tokens=np.array([3, 4, 5]))
    np.savez(tmp_path / "inputs.npz", **data)
    (tmp_path / "worker.py").write_text(WORKER)

    port, out = _free_port(), str(tmp_path / "out.npz")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), "--distributed",
                               f"--coordinator_address=localhost:{port}", "--num_processes=2",
                               f"--process_id={i}", "--mesh=data:4,model:2", ckpt, out],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    got = np.load(out)
    ref_logits = np.asarray(sj.forward(model, batch).logits)
    iv = sj.Intervention(site="lm.resid_pre", op="replace", layer=layer, index=data["index"], source=data["source"])
    ref = sj.patch_sweep(model, batch, [iv], sj.Readout(data["pos"], data["tokens"]), chunk_size=3)
    np.testing.assert_allclose(got["logits"], ref_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["sweep"], ref.logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["argmax"], ref.argmax)
