"""benchmarks/device_check.py cannot rot: its --smoke mode (the same steps as on a GPU, tiny
models on this CPU) writes every step's JSON without an error."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_smoke(tmp_path):
    out = tmp_path / "check.json"
    # one device (the suite's other XLA flags kept)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), "PYTHONPATH": REPO}
    # time boxes sized for this shared CPU (the GPU run's default is 450 s in all)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "device_check.py"), "--smoke", "--budget_s", "1500",
           "--out", str(out)]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert set(steps) == {"env", "parity", "attention", "real_size/qwen2_vl", "real_size/gemma3"}
    assert not [k for k, v in steps.items() if "error" in v], steps
    assert set(steps["parity"]) - {"step_s"} == {f"{f}/{d}" for f in ("qwen2_vl", "gemma3", "pixtral", "qwen2_5_vl", "llava")
                                                  for d in ("float32", "bfloat16")}
    assert all(v["within"] for k, v in steps["parity"].items() if k != "step_s")
    for fam in ("qwen2_vl", "gemma3"):
        s = steps[f"real_size/{fam}"]
        assert s["forward_flops"] > 0 and s["patched_forwards_per_s"] > 0 and s["largest_chunk_that_ran"]
    atp = steps["real_size/qwen2_vl"]["attribution"]
    assert atp["s"] > 0 and atp["exact_s_over_attribution_s"] > 0 and atp["mean_abs_exact_change"] > 0
