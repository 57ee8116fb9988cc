"""Benchmark bow_jax k-means against scikit-learn on synthetic feature-like data.

  python scripts/benchmark_kmeans.py --n 1000000 --d 256 --k 2048 --iters 10 --json out.json

Data: ReLU'd Gaussian mixture around random non-negative centres (like post-ReLU conv features),
generated once. Timed, each on the same data with the same iteration budget:
  ours lloyd       k-means++ (subsample) + `iters` Lloyd iterations, tol=0 (jit, compile timed apart)
  ours minibatch   k-means++ (subsample) + `mb_epochs` passes of mini-batches
  sklearn KMeans   init='k-means++', n_init=1, max_iter=iters, tol=0, algorithm='lloyd'
  sklearn MiniBatchKMeans  same batch size, same number of steps, no early stopping
Prints a markdown table and writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bow_jax.bow import kmeans as km


def make_features(n, d, n_modes, seed):
    """ReLU(centre + noise) rows around `n_modes` random centres; float32 [n, d]."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (n_modes, d)).astype(np.float32)
    scales = rng.uniform(0.3, 1.0, (n_modes, 1)).astype(np.float32)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        mode = rng.integers(0, n_modes, stop - start)
        noise = rng.standard_normal((stop - start, d), dtype=np.float32)
        x[start:stop] = np.maximum(centres[mode] + scales[mode] * noise, 0.0)
    return x


def time_ours(name, fit, key, x):
    """Compile ahead of time, then run once; returns a result row."""
    fn = jax.jit(fit)
    start = time.perf_counter()
    compiled = fn.lower(key, x).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    res = jax.block_until_ready(compiled(key, x))
    run_s = time.perf_counter() - start
    return dict(name=name, seconds=run_s, compile_seconds=compile_s, inertia=float(res.inertia),
                n_iter=int(res.n_iter))


def time_sklearn(name, estimator, x):
    start = time.perf_counter()
    estimator.fit(x)
    run_s = time.perf_counter() - start
    return dict(name=name, seconds=run_s, compile_seconds=None, inertia=float(estimator.inertia_),
                n_iter=int(estimator.n_iter_ if hasattr(estimator, "n_iter_") else -1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10, help="Lloyd iterations (both)")
    parser.add_argument("--batch-size", type=int, default=1024, help="mini-batch size (both)")
    parser.add_argument("--mb-epochs", type=float, default=1.0,
                        help="mini-batch budget in passes over the data (both)")
    parser.add_argument("--modes", type=int, default=None, help="mixture modes (default 2k)")
    parser.add_argument("--chunk-size", type=int, default=None, help="ours: rows per step")
    parser.add_argument("--init-sample-size", type=int, default=None, help="ours: seeding rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma list of: ours,ours_mb,sk,sk_mb,seed")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    x_np = make_features(args.n, args.d, args.modes or 2 * args.k, args.seed)
    x = jax.device_put(x_np)
    key = jax.random.key(args.seed)
    chunk = args.chunk_size or km.default_chunk_size(args.k)
    init_m = args.init_sample_size or km.default_init_sample_size(args.n, args.k)
    mb_steps = max(1, int(args.mb_epochs * args.n) // args.batch_size)
    rows = []

    def report(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "seed" not in skip:
        report(time_ours("ours k-means++ seeding only", lambda key, x: km.KMeansResult(
            km.kmeans_plus_plus(key, x, args.k, init_sample_size=init_m), jnp.zeros(()),
            jnp.zeros(()), jnp.zeros((), jnp.int32)), key, x))
    if "ours" not in skip:
        report(time_ours("ours lloyd", lambda key, x: km.kmeans(
            key, x, args.k, n_iter=args.iters, tol=0.0, chunk_size=chunk,
            init_sample_size=init_m), key, x))
    if "ours_mb" not in skip:
        report(time_ours("ours minibatch", lambda key, x: km.minibatch_kmeans(
            key, x, args.k, batch_size=args.batch_size, n_steps=mb_steps, chunk_size=chunk,
            init_sample_size=init_m), key, x))
    if "sk" not in skip or "sk_mb" not in skip:
        from sklearn.cluster import KMeans, MiniBatchKMeans
    if "sk" not in skip:
        report(time_sklearn("sklearn KMeans", KMeans(
            args.k, init="k-means++", n_init=1, max_iter=args.iters, tol=0.0, algorithm="lloyd",
            random_state=args.seed), x_np))
    if "sk_mb" not in skip:
        # sklearn counts max_iter in passes; its step count is max_iter * n // batch_size.
        report(time_sklearn("sklearn MiniBatchKMeans", MiniBatchKMeans(
            args.k, init="k-means++", n_init=1, batch_size=args.batch_size,
            max_iter=max(1, round(args.mb_epochs)), max_no_improvement=None, tol=0.0,
            init_size=init_m, random_state=args.seed), x_np))

    import sklearn
    meta = dict(
        date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv),
        n=args.n, d=args.d, k=args.k, iters=args.iters, batch_size=args.batch_size,
        minibatch_steps=mb_steps, chunk_size=chunk, init_sample_size=init_m,
        jax=jax.__version__, sklearn=sklearn.__version__, backend=jax.default_backend(),
        devices=jax.device_count(), cpu_count=os.cpu_count(), machine=platform.machine())
    by_name = {r["name"]: r for r in rows}
    for ours, theirs in (("ours lloyd", "sklearn KMeans"),
                         ("ours minibatch", "sklearn MiniBatchKMeans")):
        if ours in by_name and theirs in by_name:
            by_name[ours]["speedup_vs_sklearn"] = by_name[theirs]["seconds"] / by_name[ours]["seconds"]
            by_name[ours]["inertia_vs_sklearn"] = by_name[ours]["inertia"] / by_name[theirs]["inertia"]

    print(f"\nN={args.n} D={args.d} K={args.k} iters={args.iters} "
          f"mini-batch {args.batch_size} x {mb_steps} steps, chunk {chunk}, seeding rows {init_m}")
    print("| method | run s | compile s | inertia | vs sklearn: speed-up | inertia ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        comp = "" if r["compile_seconds"] is None else f"{r['compile_seconds']:.1f}"
        speed = f"{r['speedup_vs_sklearn']:.1f}x" if "speedup_vs_sklearn" in r else ""
        ratio = f"{r['inertia_vs_sklearn']:.4f}" if "inertia_vs_sklearn" in r else ""
        print(f"| {r['name']} | {r['seconds']:.1f} | {comp} | {r['inertia']:.6g} | {speed} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)


if __name__ == "__main__":
    main()
