"""``flaxdiff data ...``: convert datasets to ArrayRecord shards, precompute latents / text embeddings, FID stats.

    flaxdiff data convert SRC OUT_DIR [--resolution 256] [--format raw|png] [--records-per-shard 1024] [--workers N]
    flaxdiff data encode SRC OUT_DIR [--autoencoder DIR] [--text-encoder SPEC] [--image-size 256]
    flaxdiff data info DIR
    flaxdiff data fid-stats SRC OUT.npz --weights pt_inception-2015-12-05-6726825d.pth [--image-size 64]

SRC of ``convert`` is an image folder (optional class sub-folders; captions from ``<image>.txt``,
``captions.jsonl`` or ``captions.csv``), a CSV / JSONL table of image paths and captions, an ``.npz``, ``mnist``,
``digits`` or ``tfds:NAME``. ``encode`` reads a converted directory (or any of those). See docs/data.md.

:func:`add_parsers` adds the ``data`` sub-command to the ``flaxdiff`` parser; :func:`command` executes it and returns
the result dict (bad input raises ValueError); :func:`run` prints it and returns the exit status (bad input: one
``flaxdiff: error: ...`` line, status 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["add_parsers", "command", "main", "run"]


def add_parsers(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data {convert,encode,info,fid-stats}`` to an ``add_subparsers()`` object; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="convert datasets to ArrayRecord shards, precompute latents/embeddings",
                                 description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = data.add_subparsers(dest="data_command", metavar="{convert,encode,info,fid-stats}", required=True)

    convert = commands.add_parser("convert", help="image folder / caption table / npz / TFDS -> ArrayRecord shards",
                                  allow_abbrev=False)
    convert.add_argument("src", help="image folder, captions .csv/.jsonl, .npz, mnist, digits or tfds:NAME")
    convert.add_argument("out_dir", help="output directory (re-running resumes an unfinished conversion)")
    convert.add_argument("--resolution", type=int, default=None,
                         help="resize (aspect kept) + centre-crop to this square size (default: keep sizes)")
    convert.add_argument("--format", dest="image_format", default="raw", choices=("raw", "png"),
                         help="raw uint8 arrays (fastest to read) or PNG bytes (smaller)")
    convert.add_argument("--records-per-shard", type=int, default=1024, help="records per shard")
    convert.add_argument("--num-shards", type=int, default=None,
                         help="number of shards (overrides --records-per-shard)")
    convert.add_argument("--workers", type=int, default=None, help="processes (default: the CPU count)")
    convert.add_argument("--split", default="train", help="split of mnist/digits/TFDS sources")
    convert.add_argument("--data-dir", default=None, help="TFDS data directory")
    convert.add_argument("--overwrite", action="store_true", help="replace a different conversion in OUT_DIR")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")

    encode = commands.add_parser("encode", help="precompute VAE latents and text embeddings into ArrayRecord shards",
                                 allow_abbrev=False)
    encode.add_argument("src", help="a converted directory (or any dataset spec of convert)")
    encode.add_argument("out_dir", help="output directory")
    encode.add_argument("--autoencoder", default=None,
                        help="autoencoder dir (diffusers VAE, flaxdiff export or checkpoint) for scaled latents")
    encode.add_argument("--text-encoder", default=None,
                        help="frozen text encoder (a TextConditioner spec: preset or export dir) for captions")
    encode.add_argument("--image-size", type=int, default=None, help="pixel size fed to the autoencoder")
    encode.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    encode.add_argument("--records-per-shard", type=int, default=1024, help="records per shard")
    encode.add_argument("--num-shards", type=int, default=None, help="number of shards")
    encode.add_argument("--text-dtype", default="float16", choices=("float16", "float32"),
                        help="storage dtype of the text embeddings")
    encode.add_argument("--seed", type=int, default=0, help="seed of randomly initialised text-encoder presets")
    encode.add_argument("--overwrite", action="store_true", help="replace a different encoding in OUT_DIR")
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")

    info = commands.add_parser("info", help="print the manifest of a converted directory", allow_abbrev=False)
    info.add_argument("dir", help="converted directory")

    stats = commands.add_parser("fid-stats", help="FID Inception statistics (mu, sigma .npz) of a dataset",
                                allow_abbrev=False)
    stats.add_argument("src", help="dataset: image folder, converted directory, .npz, mnist, ...")
    stats.add_argument("out", help="output .npz (keys mu, sigma, count: the layout pytorch-fid reads)")
    stats.add_argument("--weights", required=True,
                       help="pt_inception-2015-12-05-6726825d.pth or its safetensors conversion (docs/fid.md)")
    stats.add_argument("--image-size", type=int, default=None,
                       help="resize + centre-crop first (the size of the samples you will compare)")
    stats.add_argument("--batch-size", type=int, default=64, help="images per Inception batch")
    stats.add_argument("--limit", type=int, default=None, help="use only the first N images")
    stats.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return data


def _convert(args: argparse.Namespace) -> dict[str, Any]:
    from flaxdiff.data import arrayrecord

    manifest = arrayrecord.convert(args.src, args.out_dir, resolution=args.resolution, image_format=args.image_format,
                                   records_per_shard=args.records_per_shard, num_shards=args.num_shards,
                                   workers=args.workers, split=args.split, data_dir=args.data_dir,
                                   overwrite=args.overwrite, progress=not args.no_progress)
    return _summary(args.out_dir, manifest)


def _encode(args: argparse.Namespace) -> dict[str, Any]:
    from flaxdiff.data import arrayrecord

    manifest = arrayrecord.encode(args.src, args.out_dir, autoencoder=args.autoencoder, text_encoder=args.text_encoder,
                                  image_size=args.image_size, batch_size=args.batch_size,
                                  records_per_shard=args.records_per_shard, num_shards=args.num_shards,
                                  text_dtype=args.text_dtype, seed=args.seed, overwrite=args.overwrite,
                                  progress=not args.no_progress)
    return _summary(args.out_dir, manifest)


def _summary(out_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("kind", "count", "image_shape", "num_classes", "caption_field", "skipped", "skipped_files",
            "latent_shape", "autoencoder", "text_encoder")
    return {"out_dir": out_dir, "shards": len(manifest["shards"]),
            **{k: manifest[k] for k in keys if manifest.get(k) is not None}}


def _info(args: argparse.Namespace) -> dict[str, Any]:
    from flaxdiff.data import arrayrecord

    return arrayrecord.read_manifest(args.dir)


def _fid_stats(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from flaxdiff.metrics import fid

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    extractor = fid.InceptionExtractor.from_weights(args.weights, batch_size=args.batch_size)
    stats = fid.stats_of_source(extractor, args.src, batch_size=args.batch_size, image_size=args.image_size,
                                limit=args.limit)
    fid.save_stats(out, stats)
    return {"out": str(out), "count": stats.count, "dim": stats.dim}


COMMANDS = {"convert": _convert, "encode": _encode, "info": _info, "fid-stats": _fid_stats}


def command(args: argparse.Namespace) -> dict[str, Any]:
    """Execute a parsed ``data`` command and return its result (bad input raises ValueError): the form the
    ``flaxdiff`` CLI's command table takes."""
    return COMMANDS[args.data_command](args)


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``data`` command: the result as JSON on stdout, status 0; a ValueError -> status 2."""
    try:
        result = command(args)
    except ValueError as err:
        sys.stderr.write(f"flaxdiff: error: {err}\n")
        return 2
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m flaxdiff.data.commands convert ...`` (the same as ``flaxdiff data convert ...``)."""
    parser = argparse.ArgumentParser(prog="flaxdiff", allow_abbrev=False)
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
