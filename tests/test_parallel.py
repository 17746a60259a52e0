"""Data parallelism and fsdp on 8 forced host devices equal a one-device run.

The forced device count must be set before jax is imported, so the runs happen in a subprocess
(tests/helpers/run_parallel.py). Tolerance: float32 losses to rtol 1e-6 and params to atol 1e-6 after 4 Adam steps
with gradient accumulation — the layouts differ only in the order of the cross-device sums.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HELPER = Path(__file__).parent / "helpers" / "run_parallel.py"


@pytest.fixture(scope="module")
def runs():
    from conftest import host_devices_env

    env = host_devices_env(8)
    proc = subprocess.run([sys.executable, str(HELPER)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["data8", "data4_fsdp2"])
def test_sharded_run_equals_single_device(runs, layout):
    single, sharded = runs["single"], runs[layout]
    assert single["devices"] == 1 and sharded["devices"] == 8
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-6)
    for a, b in zip(sharded["params"], single["params"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # and training moved the loss at all
    assert single["losses"][-1] < single["losses"][0]


def test_fsdp_shards_params_and_optimizer_state(runs):
    assert runs["data8"]["fsdp_sharded_leaves"] == 0
    # 6 param leaves; only the (1,) output bias has no dim divisible by 2; Adam's mu and nu follow the params
    assert runs["data4_fsdp2"]["fsdp_sharded_leaves"] == 5
    assert runs["data4_fsdp2"]["opt_fsdp_sharded_leaves"] == 10


def test_global_batch_not_divisible_by_devices(runs):
    assert runs["batch_error"] == ("global batch 12 is not divisible by device count 8 x grad_accum_steps 2; "
                                   "use a multiple of 16")
