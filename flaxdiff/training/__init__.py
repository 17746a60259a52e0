"""Training: the Trainer (given a loss object), its train state, the ("data", "fsdp") mesh, checkpoints, logging.

    from flaxdiff import objectives
    from flaxdiff.training import Trainer, TrainConfig
    loss = objectives.DiffusionLoss(schedule, predictor, weighting, time_sampler)
    trainer = Trainer(model, train_config=TrainConfig(total_steps=10_000), example_batch=example_batch, loss=loss,
                      workdir="runs/x")
    trainer.fit(loader)        # resumes from runs/x/checkpoints if present

``DiffusionTrainer`` is the same class (legacy positional form: model, model_config, schedule, predictor,
weighting, time_sampler, train_config, example_batch).
"""
from flaxdiff.training.checkpoint import (
    CheckpointManager,
    build_model,
    check_config,
    load_components,
    load_config,
    load_params,
)
from flaxdiff.training.config import TrainConfig, make_lr_schedule, make_optimizer
from flaxdiff.training.logging import MetricsLogger, image_grid, save_image_grid
from flaxdiff.training.parallel import initialize_distributed, make_global_batch, make_mesh
from flaxdiff.training.state import TrainState, ema_decay_at
from flaxdiff.training.trainer import DiffusionTrainer, Trainer, TrainingDiverged, make_sample_fn

__all__ = [
    "CheckpointManager", "build_model", "check_config", "load_components", "load_config", "load_params",
    "TrainConfig", "make_lr_schedule", "make_optimizer", "MetricsLogger", "image_grid", "save_image_grid",
    "initialize_distributed", "make_global_batch", "make_mesh", "TrainState", "ema_decay_at",
    "Trainer", "DiffusionTrainer", "TrainingDiverged", "make_sample_fn",
]
