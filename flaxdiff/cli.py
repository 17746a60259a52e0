"""The ``flaxdiff`` command: sample, evaluate and export training checkpoints.

    flaxdiff sample runs/mnist --out grid.png [--classes 0,3,7] [--per-class 10] [--guidance 3] [--steps 20]
    flaxdiff sample runs/text --out grid.png --prompt "the number 7" "a handwritten digit two" [--per-class 8]
    flaxdiff sample --diffusers path/to/sd15 --out grid.png --prompts "a red apple" [--negative-prompts "blurry"]
    flaxdiff eval runs/mnist [--per-class 100] [--out metrics.json]
    flaxdiff export runs/mnist exported/ [--step N] [--no-ema]

CHECKPOINT_DIR is a training run directory (``training.py --workdir``) or its ``checkpoints/`` directory; the
checkpoint's own config rebuilds the model, schedule and predictor, and every sampling flag left out (sampler,
steps, grid, guidance, guidance interval, EMA or raw params) takes the run's ``sample`` settings, the ones it was
measured with. Guidance ``w = 1`` means none (one conditional forward). Bad input prints one ``flaxdiff: error: ...`` line and exits with status 2; existing outputs are never
replaced without ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flaxdiff.config import check_writable

logger = logging.getLogger(__name__)

__all__ = ["main", "build_parser"]


class CLIError(ValueError):
    """A user error reported as one line."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,3,7, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one class, got {text!r}")
    return values


def _int_at_least(low: int, accepted: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``; anything else names the text and ``accepted``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: {accepted}")
        return value

    return parse


_positive_int = _int_at_least(1, "an integer >= 1")
_step = _int_at_least(0, "a checkpoint step (an integer >= 0)")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: a finite number") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: a finite number")
    return value


def _interval(text: str) -> list[float] | None:
    if text.lower() in ("none", "null"):
        return None
    try:
        values = [float(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or not all(np.isfinite(values)) or not 0 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: LO,HI with 0 <= LO <= HI (sigma / alpha), "
                                         f"or none")
    return values


def _add_sampling(parser: argparse.ArgumentParser, diffusers: bool = False) -> None:
    if diffusers:
        parser.add_argument("checkpoint_dir", nargs="?", default=None,
                            help="training run directory, its checkpoints/ directory, or a diffusers pipeline "
                                 "directory (model_index.json)")
        parser.add_argument("--diffusers", metavar="PATH", default=None,
                            help="a diffusers pipeline directory (StableDiffusion, SDXL, DiT) instead of a run")
        parser.add_argument("--negative-prompts", nargs="+", default=None,
                            help="negative prompts of a diffusers text-to-image pipeline (one, or one per prompt)")
        parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                            help="compute dtype of a diffusers pipeline")
    else:
        parser.add_argument("checkpoint_dir", help="training run directory or its checkpoints/ directory")
    parser.add_argument("--step", type=_step, default=None, help="checkpoint step (default: the latest)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_const", const=True, default=None,
                     help="use the EMA params (default: the run's sample.ema)")
    ema.add_argument("--no-ema", dest="ema", action="store_const", const=False, help="use the raw params")
    parser.add_argument("--sampler", default=None,
                        help="sampler name (flaxdiff.samplers.available(); default: the run's sample.sampler)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    parser.add_argument("--grid", default=None, help="timestep grid (flaxdiff.timesteps; default: the run's)")
    parser.add_argument("--guidance", type=_finite, default=None,
                        help="classifier-free guidance scale w >= 0 (1: no guidance; default: the run's)")
    parser.add_argument("--guidance-interval", type=_interval, default=None, metavar="LO,HI",
                        help="apply guidance only for LO <= sigma/alpha <= HI (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="seed; image i uses fold_in(PRNGKey(seed), i)")
    parser.add_argument("--batch-size", type=int, default=250, help="images per forward batch")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors (or FLAXDIFF_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    from flaxdiff.data import commands as data_commands
    from flaxdiff.metrics import fid

    parser = _Parser(prog="flaxdiff", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="{sample,eval,export,data}", required=True)

    sample = commands.add_parser("sample", help="write a PNG grid of samples (one row per class)",
                                 allow_abbrev=False)
    _add_sampling(sample, diffusers=True)
    sample.add_argument("--out", required=True, help="output PNG path")
    sample.add_argument("--classes", type=_int_list, default=None,
                        help="comma-separated classes, one grid row each (default: all classes)")
    sample.add_argument("--per-class", type=_positive_int, default=None,
                        help="images per class row (default 10, or --num-images / number of classes)")
    sample.add_argument("--num-images", type=_positive_int, default=None,
                        help="total images (unconditional models, or split evenly over the classes)")
    sample.add_argument("--prompt", "--prompts", dest="prompts", nargs="+", default=None,
                        help="text prompts, one grid row each (text-conditioned checkpoints)")
    sample.add_argument("--columns", type=_positive_int, default=None, help="grid columns (default: images per class)")

    evaluate = commands.add_parser("eval", help="class accuracy and Fréchet distance of class-conditional samples",
                                   allow_abbrev=False)
    _add_sampling(evaluate)
    evaluate.add_argument("--per-class", type=int, default=100, help="samples per class")
    evaluate.add_argument("--out", default=None,
                          help="JSON output (default: <checkpoint_dir>/eval_step_<step>.json)")
    evaluate.add_argument("--grid-png", default=None,
                          help="also write a PNG grid of the first 10 samples per class to this file")
    evaluate.add_argument("--classifier-cache", default=None,
                          help="directory of the cached digit classifier (default: $FLAXDIFF_CACHE/classifier "
                               "or ~/.cache/flaxdiff/classifier)")
    fid.add_eval_arguments(evaluate)  # --metric fid --ref REF --weights W --num-samples N (docs/fid.md)

    export = commands.add_parser("export", help="write model.safetensors + config.json from a checkpoint",
                                 allow_abbrev=False)
    export.add_argument("checkpoint_dir", help="training run directory or its checkpoints/ directory")
    export.add_argument("out_dir", help="output directory (must not exist or be empty, unless --overwrite)")
    export.add_argument("--step", type=_step, default=None, help="checkpoint step (default: the latest)")
    export.add_argument("--no-ema", action="store_true", help="export the raw params instead of the EMA params")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    data_commands.add_parsers(commands)  # flaxdiff data convert|encode|info|fid-stats (docs/data.md)
    return parser


def _check_output_file(path: str, overwrite: bool, suffix: str | None = None) -> Path:
    """The output path, checked before any sampling: suffix, no silent replacement, a writable directory."""
    out = Path(path).expanduser()
    if suffix is not None and out.suffix.lower() != suffix:
        raise CLIError(f"--out {path}: expected a {suffix} file")
    if out.exists() and out.is_dir():
        raise CLIError(f"{out} is a directory; give a file path")
    if out.exists() and not overwrite:
        raise CLIError(f"{out} already exists; pass --overwrite to replace it")
    check_writable(out)
    return out


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling flags a run and a diffusers pipeline share, checked before anything is loaded."""
    from flaxdiff import samplers, timesteps

    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps {args.steps} is invalid; accepted: an integer >= 1")
    if args.guidance is not None and args.guidance < 0:
        raise CLIError(f"--guidance {args.guidance} is invalid; accepted: a finite number >= 0 (1: no guidance)")
    if args.sampler is not None and args.sampler not in samplers.available():
        raise CLIError(f"--sampler {args.sampler!r} is unknown; accepted: {', '.join(samplers.available())}")
    if args.grid is not None and args.grid not in timesteps.available():
        raise CLIError(f"--grid {args.grid!r} is unknown; accepted: {', '.join(timesteps.available())}")


def _load(args: argparse.Namespace) -> Any:
    """The run's Pipeline, with the sampling flags checked first (before the params are read)."""
    from flaxdiff.pipeline import Pipeline

    _check_sampling_flags(args)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size} is invalid; accepted: an integer >= 1")
    return Pipeline.from_pretrained(args.checkpoint_dir, step=args.step, ema=args.ema)


def _settings(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings of this call: each flag given, else the run's ``sample`` section."""
    sample = pipe.sample
    guidance = sample.guidance if args.guidance is None else args.guidance
    if pipe.null_cond is None:
        guidance = 1.0
    return {"sampler": args.sampler or sample.sampler, "steps": args.steps or sample.steps,
            "grid": args.grid or sample.grid, "guidance_scale": guidance,
            "guidance_interval": args.guidance_interval if args.guidance_interval is not None
            else sample.guidance_interval}


def _sample_labels(pipe: Any, args: argparse.Namespace) -> tuple[np.ndarray | None, int, int]:
    """(labels or None, number of images, grid columns)."""
    if pipe.text is not None:
        raise CLIError(f"{args.checkpoint_dir} is text-conditioned; pass --prompt \"...\"")
    if args.prompts is not None:
        raise CLIError(f"--prompts needs a text-conditioned checkpoint; {args.checkpoint_dir} is "
                       f"{'class-conditional' if pipe.num_classes else 'unconditional'}"
                       f"{'; use --classes' if pipe.num_classes else ''}")
    if pipe.num_classes == 0:
        if args.classes is not None:
            raise CLIError(f"--classes given but {args.checkpoint_dir} is unconditional; use --num-images")
        count = args.num_images or (args.per_class or 8) ** 2
        columns = args.columns or args.per_class or int(np.ceil(np.sqrt(count)))
        return None, count, columns
    classes = args.classes if args.classes is not None else list(range(pipe.num_classes))
    bad = [c for c in classes if not 0 <= c < pipe.num_classes]
    if bad:
        raise CLIError(f"--classes {bad[0]} is outside 0..{pipe.num_classes - 1}")
    if args.per_class is not None and args.num_images is not None:
        raise CLIError("--per-class and --num-images conflict; give one of them")
    per_class = args.per_class or (max(1, args.num_images // len(classes)) if args.num_images else 10)
    if per_class < 1:
        raise CLIError(f"--per-class {per_class} must be >= 1")
    labels = np.repeat(np.asarray(classes, np.int32), per_class)
    return labels, len(labels), args.columns or per_class


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from flaxdiff.training import save_image_grid

    out = _check_output_file(args.out, args.overwrite, ".png")
    if args.diffusers is not None and args.checkpoint_dir is not None:
        raise CLIError("give a checkpoint directory or --diffusers PATH, not both")
    source = args.diffusers or args.checkpoint_dir
    if source is None:
        raise CLIError("give a checkpoint directory (or --diffusers PATH)")
    if args.diffusers is not None or (Path(source) / "model_index.json").is_file():
        return _sample_diffusers(source, out, args)
    from flaxdiff.interop import diffusers_finetune

    if diffusers_finetune.is_finetune_run(source):
        return _sample_finetuned(source, out, args)
    pipe = _load(args)
    prompts = None
    if pipe.text is not None and args.prompts is not None:
        if args.classes is not None:
            raise CLIError("--classes given but the checkpoint is text-conditioned; use --prompt")
        per_prompt = args.per_class or (max(1, args.num_images // len(args.prompts)) if args.num_images else 8)
        prompts = [prompt for prompt in args.prompts for _ in range(per_prompt)]
        labels, count, columns = None, len(prompts), args.columns or per_prompt
    else:
        labels, count, columns = _sample_labels(pipe, args)
    settings = _settings(pipe, args)
    images = pipe.generate(num_images=count if labels is None and prompts is None else None, labels=labels,
                           prompts=prompts, seed=args.seed, output="float", batch_size=args.batch_size, **settings)
    save_image_grid(images, out, columns=columns)
    rows = int(np.ceil(count / columns))
    height, width = images.shape[1:3]
    result = {"out": str(out), "images": count, "rows": rows, "columns": columns,
              "pixels": [rows * height, columns * width], "step": pipe.step, **settings}
    logger.info("wrote %s: %d images, %d x %d grid", out, count, rows, columns)
    return result


def _sample_diffusers(path: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``flaxdiff sample --diffusers PATH --prompts ...``: one grid row per prompt (or DiT class)."""
    from flaxdiff.interop.diffusers_pipeline import sample_grid

    if not (Path(path) / "model_index.json").is_file():
        raise CLIError(f"--diffusers {path}: no model_index.json (expected a diffusers pipeline directory)")
    _check_sampling_flags(args)
    negative = args.negative_prompts
    if negative is not None and args.prompts is not None and len(negative) == 1:
        negative = negative * len(args.prompts)
    return sample_grid(path, out, prompts=args.prompts, labels=args.classes, per_prompt=args.per_class or 1,
                       steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, grid=args.grid,
                       seed=args.seed, guidance_interval=args.guidance_interval, dtype=args.dtype,
                       negative_prompts=negative)


def _sample_finetuned(path: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``flaxdiff sample RUN`` of a run that fine-tuned a diffusers pipeline: the pipeline with the run's params,
    the flags left out taken from the run's ``sample`` section."""
    from flaxdiff.interop import diffusers_finetune
    from flaxdiff.interop.diffusers_pipeline import sample_grid

    _check_sampling_flags(args)
    pipe = diffusers_finetune.load_finetuned(path, step=args.step, ema=args.ema, dtype=args.dtype)
    sample = pipe.run.sample
    negative = args.negative_prompts
    if negative is not None and args.prompts is not None and len(negative) == 1:
        negative = negative * len(args.prompts)
    result = sample_grid(pipe, out, prompts=args.prompts, labels=args.classes, per_prompt=args.per_class or 1,
                         steps=args.steps or sample.steps,
                         guidance_scale=sample.guidance if args.guidance is None else args.guidance,
                         sampler=args.sampler or sample.sampler, grid=args.grid or sample.grid, seed=args.seed,
                         guidance_interval=args.guidance_interval if args.guidance_interval is not None
                         else sample.guidance_interval, negative_prompts=negative)
    return {**result, "step": pipe.step}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from flaxdiff import metrics
    from flaxdiff.training import save_image_grid

    pipe = _load(args)
    if args.metric == "fid":
        from flaxdiff.metrics import fid

        return fid.eval_command(args, pipe, _settings(pipe, args))
    if pipe.num_classes == 0:
        raise CLIError(f"eval scores class-conditional samples; {args.checkpoint_dir} is unconditional")
    if args.per_class < 2:
        raise CLIError(f"--per-class {args.per_class} must be >= 2 (the Fréchet distance needs a covariance)")
    if pipe.num_classes != 10 or pipe.image_shape[-1] not in (1, 3):
        raise CLIError(f"eval uses the MNIST digit classifier (10 classes); this checkpoint has "
                       f"{pipe.num_classes} classes and images {pipe.image_shape}")
    out = _check_output_file(args.out, args.overwrite, ".json") if args.out else (
        Path(args.checkpoint_dir) / f"eval_step_{pipe.step}.json")
    if not args.out and out.exists() and not args.overwrite:
        raise CLIError(f"{out} already exists; pass --overwrite or --out")
    check_writable(out)
    grid = _check_output_file(args.grid_png, args.overwrite, ".png") if args.grid_png else None
    labels = np.repeat(np.arange(pipe.num_classes, dtype=np.int32), args.per_class)
    settings = _settings(pipe, args)
    images = pipe.generate(labels=labels, seed=args.seed, output="float", batch_size=args.batch_size, **settings)
    classifier = metrics.get_mnist_classifier(image_size=CLASSIFIER_SIZE, cache_dir=args.classifier_cache)
    scores = metrics.evaluate_class_conditional(images, labels, classifier)
    result = {**scores, "step": pipe.step, **settings, "seed": args.seed, "per_class": args.per_class,
              "ema": pipe.sample.ema if args.ema is None else args.ema}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    result["out"] = str(out)
    if grid is not None:
        first = np.concatenate([images[labels == c][:10] for c in range(pipe.num_classes)])
        save_image_grid(first, grid, columns=min(10, args.per_class))
    return result


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from flaxdiff import interop
    from flaxdiff.pipeline import resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(args.checkpoint_dir)
    out = Path(args.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"{out} is not empty; pass --overwrite to write into it")
    check_writable(out / "config.json")
    from flaxdiff.interop import diffusers_finetune

    if diffusers_finetune.is_finetune_run(directory):
        # a fine-tuned diffusers denoiser goes back into a diffusers pipeline directory
        path = diffusers_finetune.export_diffusers(directory, out, step=args.step, ema=False if args.no_ema else None)
        return {"out_dir": str(path), "files": sorted(p.name for p in Path(path).iterdir())}
    path = interop.export_checkpoint(directory, out, step=args.step, ema=not args.no_ema)
    return {"out_dir": str(path), "files": sorted(p.name for p in Path(path).iterdir())}


CLASSIFIER_SIZE = 32  # the classifier resizes every sample to 32x32, so all image sizes share one cached model

def cmd_data(args: argparse.Namespace) -> dict[str, Any]:
    from flaxdiff.data import commands as data_commands

    return data_commands.command(args)


COMMANDS = {"sample": cmd_sample, "eval": cmd_eval, "export": cmd_export, "data": cmd_data}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flaxdiff`` console script; returns the exit status."""
    from flaxdiff.logs import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("FLAXDIFF_DEBUG", "") not in ("", "0")
    setup_logging(fmt="%(message)s", datefmt=None, debug=debug)
    logging.getLogger("flaxdiff.data").setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        result = COMMANDS[args.command](args)
    except ValueError as err:
        if debug:
            raise
        message = " ".join(str(err).split())
        sys.stderr.write(f"flaxdiff: error: {message}\n")
        return 2
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
