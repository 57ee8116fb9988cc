"""Benchmark bow_jax k-means against scikit-learn on synthetic feature-like data.

  python scripts/benchmark_kmeans.py --n 1000000 --d 256 --k 2048 --iters 10 --json out.json

Data: ReLU'd Gaussian mixture around random centres (like post-ReLU conv features), float32,
generated once. Each method runs once on the same data with the same budget:
  ours lloyd               k-means++ on a subsample + `iters` Lloyd iterations, tol=0
                           (--full-seeding: also with k-means++ on all rows)
  ours minibatch           k-means++ on a subsample + `mb_epochs` passes of mini-batches
  sklearn KMeans           init='k-means++', n_init=1, max_iter=iters, tol=0, algorithm='lloyd'
  sklearn MiniBatchKMeans  same batch size and number of steps, no early stopping, init_size =
                           our seeding sample
Ours is compiled ahead of time (compile seconds reported apart) and then run once. Wall and process
CPU seconds are both reported: on a shared machine CPU seconds are the steadier number.
Prints a markdown table and writes everything as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=10, help="Lloyd iterations (both)")
    parser.add_argument("--batch-size", type=int, default=1024, help="mini-batch size (both)")
    parser.add_argument("--mb-epochs", type=int, default=1,
                        help="mini-batch budget in passes over the data (both)")
    parser.add_argument("--modes", type=int, default=None, help="mixture modes (default 2k)")
    parser.add_argument("--chunk-size", type=int, default=None, help="ours: rows per step")
    parser.add_argument("--init-sample-size", type=int, default=None, help="ours: seeding rows")
    parser.add_argument("--threads", type=int, default=None,
                        help="limit both libraries to this many cores (default: all)")
    parser.add_argument("--full-seeding", action="store_true",
                        help="also run ours lloyd with k-means++ on all rows (as scikit-learn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma list of: seed,ours,ours_mb,sk,sk_mb")
    parser.add_argument("--json", default=None, help="write results here")
    return parser.parse_args(argv)


def make_features(n, d, n_modes, seed):
    """ReLU(centre + noise) rows around `n_modes` random centres; float32 [n, d]."""
    import numpy as np
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


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        # Both libraries get the same cores: pin the process (XLA:CPU sizes its thread pool from
        # the cores it may use) and cap scikit-learn's OpenMP/BLAS pools with threadpoolctl.
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.threads]))
    import jax
    import sklearn
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    from bow_jax.bow import kmeans as km

    skip = set(filter(None, args.skip.split(",")))
    x_np = make_features(args.n, args.d, args.modes or 2 * args.k, args.seed)
    x = jax.device_put(x_np)
    key = jax.random.key(args.seed)
    chunk = args.chunk_size or km.default_chunk_size(args.k)
    init_m = args.init_sample_size or km.default_init_sample_size(args.n, args.k)
    mb_steps = max(1, args.mb_epochs * args.n // args.batch_size)
    rows = []

    def report(name, clock, inertia, n_iter, compile_clock=None):
        row = dict(name=name, seconds=clock.wall, cpu_seconds=clock.cpu,
                   compile_seconds=compile_clock and compile_clock.wall,
                   compile_cpu_seconds=compile_clock and compile_clock.cpu, inertia=inertia,
                   n_iter=n_iter, load_average=os.getloadavg()[0])
        rows.append(row)
        print(json.dumps(row), flush=True)

    def ours(name, fit):
        with Clock() as compile_clock:
            compiled = jax.jit(fit).lower(key, x).compile()
        with Clock() as clock:
            res = jax.block_until_ready(compiled(key, x))
        inertia = float(res.inertia) if hasattr(res, "inertia") else None
        n_iter = int(res.n_iter) if hasattr(res, "n_iter") else None
        report(name, clock, inertia, n_iter, compile_clock)

    def theirs(name, estimator):
        with threadpool_limits(args.threads), Clock() as clock:
            estimator.fit(x_np)
        report(name, clock, float(estimator.inertia_), int(estimator.n_iter_))

    if "seed" not in skip:
        ours("ours k-means++ seeding only",
             lambda key, x: km.kmeans_plus_plus(key, x, args.k, init_sample_size=init_m))
    if "ours" not in skip:
        ours("ours lloyd", lambda key, x: km.kmeans(
            key, x, args.k, n_iter=args.iters, tol=0.0, chunk_size=chunk, init_sample_size=init_m))
    if args.full_seeding:
        ours("ours lloyd, seeding on all rows", lambda key, x: km.kmeans(
            key, x, args.k, n_iter=args.iters, tol=0.0, chunk_size=chunk, init_sample_size=args.n))
    if "ours_mb" not in skip:
        ours("ours minibatch", lambda key, x: km.minibatch_kmeans(
            key, x, args.k, batch_size=args.batch_size, n_steps=mb_steps, chunk_size=chunk,
            init_sample_size=init_m))
    if "sk" not in skip:
        theirs("sklearn KMeans", KMeans(
            args.k, init="k-means++", n_init=1, max_iter=args.iters, tol=0.0, algorithm="lloyd",
            random_state=args.seed))
    if "sk_mb" not in skip:
        # sklearn counts max_iter in passes: max_iter * n // batch_size steps.
        theirs("sklearn MiniBatchKMeans", MiniBatchKMeans(
            args.k, init="k-means++", n_init=1, batch_size=args.batch_size,
            max_iter=args.mb_epochs, max_no_improvement=None, tol=0.0, init_size=init_m,
            random_state=args.seed))

    by_name = {r["name"]: r for r in rows}
    pairs = (("ours lloyd", "sklearn KMeans"),
             ("ours lloyd, seeding on all rows", "sklearn KMeans"),
             ("ours minibatch", "sklearn MiniBatchKMeans"))
    for mine, ref in pairs:
        if mine in by_name and ref in by_name:
            a, b = by_name[mine], by_name[ref]
            a["speedup_wall"] = b["seconds"] / a["seconds"]
            a["speedup_cpu"] = b["cpu_seconds"] / a["cpu_seconds"]
            a["inertia_ratio"] = a["inertia"] / b["inertia"]
    meta = dict(
        date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv),
        n=args.n, d=args.d, k=args.k, iters=args.iters, batch_size=args.batch_size,
        minibatch_steps=mb_steps, chunk_size=chunk, init_sample_size=init_m, threads=args.threads,
        jax=jax.__version__, sklearn=sklearn.__version__, backend=jax.default_backend(),
        devices=jax.device_count(), cpu_count=os.cpu_count(), machine=platform.processor() or
        platform.machine())

    print(f"\nN={args.n} D={args.d} K={args.k}, {args.iters} Lloyd iterations, mini-batch "
          f"{args.batch_size} x {mb_steps} steps; ours: chunk {chunk}, seeding rows {init_m}")
    print("| method | wall s | CPU s | compile wall / CPU s | inertia | speed-up wall / CPU "
          "| inertia / sklearn |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        compile_s = ("" if r["compile_seconds"] is None else
                     f"{r['compile_seconds']:.1f} / {r['compile_cpu_seconds']:.1f}")
        inertia = "" if r["inertia"] is None else f"{r['inertia']:.6g}"
        speed = (f"{r['speedup_wall']:.1f}x / {r['speedup_cpu']:.1f}x"
                 if "speedup_wall" in r else "")
        ratio = f"{r['inertia_ratio']:.4f}" if "inertia_ratio" in r else ""
        print(f"| {r['name']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {compile_s} | "
              f"{inertia} | {speed} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)


if __name__ == "__main__":
    main()
