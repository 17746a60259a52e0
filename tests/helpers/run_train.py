"""Train the tiny conditional model on the sklearn digits through the grain loader; used by the resume, SIGTERM
and multi-process tests.

Every step's loss goes to <workdir>/metrics.jsonl (process 0). At a normal or signalled exit the script writes
--out (JSON: the step it started from, its own losses and the final params) and exits 0.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flaxdiff import data, losses, predictors, schedules  # noqa: E402
from flaxdiff.training import DiffusionTrainer, TrainConfig, initialize_distributed  # noqa: E402
from helpers.tiny_model import TinyDenoiser  # noqa: E402


class SlowIterator:
    """Delegates to a grain iterator, sleeping ``delay`` seconds per batch (so a test can interrupt mid-run)."""

    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def __iter__(self):
        return self

    def __next__(self):
        if self.delay:
            time.sleep(self.delay)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="per process")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    args = parser.parse_args()

    initialize_distributed(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout_seconds=15)
    source = data.digits_source("train")
    loader = SlowIterator(data.make_loader(source, batch_size_per_process=args.batch, image_size=8, seed=0),
                          args.step_delay)
    config = TrainConfig(learning_rate=3e-3, warmup_steps=3, lr_decay="cosine", decay_steps=50,
                         total_steps=args.steps,
                         ema_decay=0.99, cond_drop_prob=0.2, null_cond={"label": 10}, log_every=1,
                         checkpoint_every=args.checkpoint_every, keep_checkpoints=2)
    model = TinyDenoiser(features=8, num_classes=10)
    example = {"image": np.zeros((1, 8, 8, 1), np.float32), "label": np.zeros((1,), np.int32)}
    trainer = DiffusionTrainer(model, {"name": "tiny_test_denoiser", "features": 8, "num_classes": 10},
                               schedules.get("cosine"), predictors.get("epsilon"), losses.weightings.get("uniform"),
                               losses.time_samplers.get("uniform"), config, example, workdir=args.workdir)
    restored = trainer.restore(loader)
    start = int(jax.device_get(trainer.state.step)) if restored else 0
    print(f"START {start}", flush=True)
    trainer.fit(loader)
    trainer.close()
    if args.out:
        params = jax.device_get(trainer.state.params)
        result = {"start": start, "step": int(jax.device_get(trainer.state.step)),
                  "losses": {int(h["step"]): h["loss"] for h in trainer.history},
                  "params": [np.asarray(leaf).ravel().tolist() for leaf in jax.tree.leaves(params)]}
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
