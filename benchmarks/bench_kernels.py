"""Kernel ceiling of a model's train step on this machine: what MFU its convolutions and matmuls alone reach.

Every ``conv_general_dilated`` and ``dot_general`` in the model's forward pass is extracted from its jaxpr
(with the exact shapes, strides, padding and dimension numbers of the train step's batch), and each distinct one is
timed alone, jitted: the forward product, and its backward (the vector-Jacobian product giving both operand
gradients, i.e. the input-gradient and weight-gradient kernels). Summing count x FLOPs and count x time over all of
them gives the FLOP rate of the model's heavy kernels with everything else (norms, activations, softmax, optimizer,
data movement between ops) costing nothing:

    kernel ceiling MFU = sum(count * XLA cost-analysis FLOPs) / sum(count * measured time) / matmul peak

No train step can beat that ceiling, so it says which MFU goals this backend can meet at all. The per-kind rows
(forward / backward, convolution / matmul) show which kernels hold it down. Usage:

    python benchmarks/bench_kernels.py [--models unet,dit] [--batch 32] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from flaxdiff import models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_text  # noqa: E402
from bench_train import MODELS, matmul_peak  # noqa: E402

HEAVY = ("conv_general_dilated", "dot_general")


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def heavy_ops(jaxpr, found: collections.Counter, eqns: dict) -> None:
    """Count every conv/dot equation of ``jaxpr`` (recursing into nested jaxprs) by a hashable signature."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in HEAVY:
            shapes = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
            key = (eqn.primitive.name, shapes, repr(sorted(eqn.params.items(), key=lambda kv: kv[0])))
            found[key] += 1
            eqns[key] = eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                heavy_ops(sub, found, eqns)


def _time(fn, args, repeats: int) -> tuple[float, float]:
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return float(cost.get("flops", 0.0)), best


def time_op(eqn, repeats: int) -> dict:
    """Forward and backward (both operand gradients) of one equation, timed alone."""
    prim, params = eqn.primitive, dict(eqn.params)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    args = [jax.random.normal(k, v.aval.shape, v.aval.dtype) for k, v in zip(keys, eqn.invars)]

    def forward(a, b):
        return prim.bind(a, b, **params)

    out = jax.eval_shape(forward, *args)
    cotangent = jax.random.normal(keys[2], out.shape, out.dtype)

    def backward(a, b, g):
        return jax.vjp(forward, a, b)[1](g)

    f_flops, f_time = _time(forward, args, repeats)
    b_flops, b_time = _time(backward, args + [cotangent], repeats)
    return {"forward_flops": f_flops, "forward_s": f_time, "backward_flops": b_flops, "backward_s": b_time}


def ceiling(name: str, batch: int, repeats: int, shape: tuple[int, ...] | None = None) -> dict:
    """The heavy kernels of model ``name``'s forward at ``batch`` (inputs of ``shape``, default the model's own)."""
    preset, overrides, default_shape = MODELS[name]
    shape = tuple(shape) if shape is not None else default_shape
    model = models.get(preset, **overrides)
    x = jnp.zeros((batch,) + shape, jnp.float32)
    c = jnp.zeros((batch,), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, c))
    closed = jax.make_jaxpr(lambda p: model.apply(p, x, c))(params)
    found, eqns = collections.Counter(), {}
    heavy_ops(closed.jaxpr, found, eqns)
    kinds = collections.defaultdict(lambda: [0.0, 0.0])
    per_op = []
    for key, count in found.items():
        row = time_op(eqns[key], repeats)
        kind = "convolution" if key[0] == "conv_general_dilated" else "matmul"
        per_op.append({"kind": kind, "operands": [list(s) for s, _ in key[1]], "count": count,
                       "seconds": count * (row["forward_s"] + row["backward_s"]),
                       "gflops": (row["forward_flops"] + row["backward_flops"])
                       / (row["forward_s"] + row["backward_s"]) / 1e9})
        for direction in ("forward", "backward"):
            kinds[(kind, direction)][0] += count * row[f"{direction}_flops"]
            kinds[(kind, direction)][1] += count * row[f"{direction}_s"]
    total_flops = sum(v[0] for v in kinds.values())
    total_time = sum(v[1] for v in kinds.values())
    return {"model": name, "batch": batch, "distinct_ops": len(found), "ops": sum(found.values()),
            "kinds": {f"{k} {d}": {"gflop": v[0] / 1e9, "seconds": v[1], "gflops": v[0] / v[1] / 1e9}
                      for (k, d), v in sorted(kinds.items())},
            "top_ops": sorted(per_op, key=lambda r: -r["seconds"]),
            "gflop": total_flops / 1e9, "seconds": total_time, "gflops": total_flops / total_time / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet,dit")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=4, help="also print the N distinct ops that take longest")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    print(f"environment: python {platform.python_version()}, jax {jax.__version__}, {os.cpu_count()} CPU cores "
          f"({platform.machine()}), load average {load_text(count=1)}", flush=True)
    peak = matmul_peak()
    print(f"jitted float32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    for name in args.models.split(","):
        row = ceiling(name, args.batch, args.repeats)
        row["ceiling_mfu"] = row["gflops"] * 1e9 / peak
        results.append(row)
        print(f"{name}: {row['ops']} conv/matmul ops ({row['distinct_ops']} distinct), batch {args.batch}", flush=True)
        for kind, v in row["kinds"].items():
            print(f"    {kind:22s} {v['gflop']:8.1f} GFLOP {v['seconds']:7.3f} s {v['gflops']:6.1f} GFLOP/s "
                  f"= {v['gflops'] * 1e9 / peak:.2f} of peak", flush=True)
        print(f"    {'all heavy kernels':22s} {row['gflop']:8.1f} GFLOP {row['seconds']:7.3f} s {row['gflops']:6.1f} "
              f"GFLOP/s -> kernel ceiling MFU {row['ceiling_mfu']:.2f}", flush=True)
        for op in row["top_ops"][:args.top]:
            shapes = " x ".join(str(tuple(s)) for s in op["operands"])
            print(f"    slowest: {op['kind']} {shapes} x{op['count']}: {op['seconds']:.3f} s forward+backward, "
                  f"{op['gflops']:.1f} GFLOP/s", flush=True)
    peak_end = matmul_peak()
    print(f"matmul peak re-measured at the end: {peak_end / 1e9:.1f} GFLOP/s (load {load_text(count=1)})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"matmul_peak_gflops": peak / 1e9, "matmul_peak_end_gflops": peak_end / 1e9,
                       "cpu_count": os.cpu_count(), "jax": jax.__version__, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
