"""Multi-host: 2 jax.distributed processes on loopback (4 CPU devices each) vs 1 process with 8.

Both run tests/multihost_worker.py: 20 steps of dp_aggregate + momentum SGD on a model sharded
over a (2, 4) mesh. The final parameters must agree (up to float32 reduction order across the
gloo collectives) and each process must hold exactly half of the noise state.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    ref = run([0, 1, 0, tmp_path / "ref.npz"], tmp_path)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    port = free_port()
    procs = [run([i, 2, port, tmp_path / "multi.npz"], tmp_path) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "multi.npz")
    for k in ("w1", "b1", "w2", "b2"):
        assert np.all(np.isfinite(a[k]))
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(b["local_state_bytes"]) * 2 == int(a["local_state_bytes"]) > 0
