"""Encode prompts with a pretrained text encoder on 2 forced host devices; prints JSON comparing the result with the
single-device cond saved by the test (an .npz).

Run with XLA_FLAGS=--xla_force_host_platform_device_count=2 (set by the test before this process imports jax).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flaxdiff.interop import load_text_encoder  # noqa: E402

PROMPTS = ["a photo of a cat", "digit seven", "the number 3"]


def main() -> None:
    directory, expected_file = sys.argv[1], sys.argv[2]
    encoder = load_text_encoder(directory)
    ids, _ = encoder.tokenize(PROMPTS)
    padded = np.concatenate([ids, ids[-1:]])
    inner = encoder._jitted(encoder.params, jax.device_put(padded, jax.sharding.NamedSharding(
        encoder.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))))
    out = encoder.encode(PROMPTS)
    expected = np.load(expected_file)
    diff = max(float(np.max(np.abs(np.asarray(out[k], np.float64) - expected[k].astype(np.float64)))) for k in out)
    print(json.dumps({"devices": jax.device_count(), "rows": int(out["text"].shape[0]),
                      "text_sharding_devices": len(inner["text"].sharding.device_set), "max_diff": diff}))


if __name__ == "__main__":
    main()
