"""Encode prompts with a pretrained text encoder on 2 forced host devices and compare with one device; prints JSON.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=2 (set by the test before this process imports jax).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flaxdiff.interop import load_text_encoder  # noqa: E402
from flaxdiff.training import make_mesh  # noqa: E402


def main() -> None:
    directory = sys.argv[1]
    prompts = ["a photo of a cat", "digit seven", "the number 3"]
    sharded = load_text_encoder(directory)
    single = load_text_encoder(directory, mesh=make_mesh(devices=jax.devices()[:1]))
    ids, _ = sharded.tokenize(prompts)
    padded = np.concatenate([ids, ids[-1:]])
    inner = sharded._jitted(sharded.params, jax.device_put(padded, jax.sharding.NamedSharding(
        sharded.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))))
    out, reference = sharded.encode(prompts), single.encode(prompts)
    diff = max(float(np.max(np.abs(np.asarray(out[k], np.float64) - np.asarray(reference[k], np.float64))))
               for k in out)
    print(json.dumps({"devices": jax.device_count(), "rows": int(out["text"].shape[0]),
                      "text_sharding_devices": len(inner["text"].sharding.device_set), "max_diff": diff}))


if __name__ == "__main__":
    main()
