"""Benchmark of `timm-widelast sep` on CPU: analysis cost beyond the bare forward, and vs plain NumPy.

    python benchmarks/diagnostics.py                      # deit_small_patch16_224, 224 px, 256 images
    python benchmarks/diagnostics.py --num-images 64 --repeats 1   # quick

(a) the bare forward pass to the tapped layer (same early stop, same batches);
(b) the full analysis (``run_report``: SVD + PCA + SEP with 3 permutations, no plots);
(c) a straightforward per-image NumPy reference of the same statistics (it keeps all tokens
    in memory for the PCA, as the obvious implementation does).
A second memory run replaces the model by an identity "block" fed the tokens directly, so the
statistics' own memory shows (ours: O(D^2) + batch temporaries; the reference: all tokens).
Timings are interleaved in one process (the machine may be shared); each role also runs
once in its own subprocess so that its peak RSS (ru_maxrss) is its own. Random
weights (pretrained=False) and random inputs; the timings do not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
LEVELS = (50, 60, 70, 80, 90)


class IdentityViT(torch.nn.Module):
    """A 'model' whose last block returns its input tokens: isolates the statistics' own memory."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(torch.nn.Identity())

    def forward(self, x):
        return self.blocks(x)


def setup(args):
    import timm

    if args.stats_only:  # tokens [n, 196, 384] as the input; the same array for every role
        gen = torch.Generator().manual_seed(0)
        return IdentityViT(), torch.randn(args.num_images, 196, 384, generator=gen)

    import timm_widelast  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.num_images, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    return model, images


def bare_forward(model, images, batch_size):
    from timm_widelast.diagnostics import TokenExtractor

    ext = TokenExtractor(model)
    for start in range(0, len(images), batch_size):
        ext(images[start: start + batch_size])


def ours(model, images, batch_size):
    from timm_widelast.diagnostics import run_report

    return run_report(model, images, None, batch_size=batch_size, progress=False, plots=False, permutations=3)


def reference(model, images, batch_size):
    """Per image: numpy SVD, numpy FFT; PCA from all tokens held in memory."""
    from timm_widelast.diagnostics import TokenExtractor

    ext = TokenExtractor(model)
    all_tokens, svd_ranks, sep_sum, count = [], [], None, 0
    for start in range(0, len(images), batch_size):
        for x in ext(images[start: start + batch_size]).numpy().astype(np.float64):
            all_tokens.append(x)
            e = np.linalg.svd(x, compute_uv=False) ** 2
            cum = np.cumsum(e) / e.sum()
            svd_ranks.append([int(np.argmax(cum >= t)) + 1 for t in THRESHOLDS])
            p = np.abs(np.fft.fft(x, axis=-1)) ** 2
            curves = 100 * np.cumsum(p, -1) / p.sum(-1, keepdims=True)
            sep_sum = curves.sum(0) if sep_sum is None else sep_sum + curves.sum(0)
            count += len(x)
    stacked = np.concatenate(all_tokens)
    w, v = np.linalg.eigh(stacked.T @ stacked / len(stacked))
    v = v[:, np.argsort(w)[::-1]]
    pca = []
    for x in all_tokens:
        e = np.cumsum(((x @ v) ** 2).sum(0)) / (x**2).sum()
        pca.append([int(np.argmax(e >= t)) + 1 for t in THRESHOLDS])
    mean = sep_sum / count
    d = [int(np.argmax(mean >= a)) + 1 for a in LEVELS]
    return {"svd": np.percentile(svd_ranks, 99, axis=0).tolist(), "pca": np.percentile(pca, 99, axis=0).tolist(),
            "sep_d": d}


def run_role(args) -> None:
    """Child process: one run of one role, to measure its own peak RSS."""
    torch.set_num_threads(args.threads)
    model, images = setup(args)
    {"bare": bare_forward, "ours": ours, "reference": reference}[args.role](model, images, args.batch_size)
    print("RESULT " + json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def timings(args) -> dict:
    """Interleaved in one process (bare, ours, bare, ours, ...), so load from other work hits both alike."""
    torch.set_num_threads(args.threads)
    model, images = setup(args)
    fns = {"bare": bare_forward, "ours": ours, "reference": reference}
    for fn in fns.values():
        fn(model, images[: args.batch_size], args.batch_size)  # warm-up batch
    times: dict = {k: [] for k in fns}
    outs = {}
    for rep in range(args.repeats):
        for role, fn in fns.items():
            if role == "reference" and rep >= args.ref_repeats:
                continue
            t0 = time.perf_counter()
            outs[role] = fn(model, images, args.batch_size)
            times[role].append(time.perf_counter() - t0)
    r = outs["ours"]
    tables = {"ours": {"svd": r["svd"]["percentiles"]["99"], "pca": r["pca"]["percentiles"]["99"],
                       "sep_d": r["sep"]["d"]}, "reference": outs["reference"]}
    return {"times": times, "tables": tables, "pass2": r["settings"]["pass2"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-repeats", type=int, default=1, help="repeats of the (slow) NumPy reference")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--stats-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-RSS subprocess runs")
    p.add_argument("--role", choices=("bare", "ours", "reference"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        return run_role(args)
    rss, rss_stats = {}, {}
    if not args.skip_memory:
        base = [sys.executable, __file__] + list(sys.argv[1:])
        # glibc's dynamic mmap threshold lets freed batch temporaries fragment the heap, which makes
        # RSS creep with the image count although nothing is kept; a fixed threshold shows the real use
        fixed = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
        for extra, into, env in (([], rss, None), (["--stats-only"], rss_stats, fixed)):
            for role in ("bare", "ours", "reference"):
                proc = subprocess.run(base + extra + ["--role", role], capture_output=True, text=True, check=True,
                                      env=env)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
                into[role] = json.loads(line[7:])["maxrss_mb"]
    res = timings(args)
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    a, b, ref = med["bare"], med["ours"], med["reference"]
    for role, ts in res["times"].items():
        print(f"{role:9s} median {med[role]:.2f} s  min {min(ts):.2f} s  (runs {', '.join(f'{t:.2f}' for t in ts)})")
    print(f"\n{args.model} @ {args.img_size}px, {args.num_images} images, batch {args.batch_size}, "
          f"{args.threads} threads, torch {torch.__version__}, pass 2 from {res['pass2']}")
    print(f"(a) bare forward to the tap  : {a:.2f} s")
    print(f"(b) full sep analysis        : {b:.2f} s   b/a = {b / a:.3f}  (goal <= 1.15); "
          f"min/min = {min(res['times']['ours']) / min(res['times']['bare']):.3f}")
    print(f"(c) per-image NumPy reference: {ref:.2f} s   speed-up c/b = {ref / b:.2f}x; "
          f"analysis beyond the forward: ours {b - a:.2f} s vs reference {ref - a:.2f} s "
          f"({(ref - a) / max(b - a, 1e-9):.1f}x)")
    if rss:
        print(f"peak RSS (own process, one run): bare forward {rss['bare']:.0f} MB, ours {rss['ours']:.0f} MB, "
              f"reference {rss['reference']:.0f} MB")
        print(f"statistics alone (identity model, the {args.num_images} x 196 x 384 float32 tokens as input, "
              "MALLOC_MMAP_THRESHOLD_=1048576): "
              f"peak RSS above holding the input: ours {rss_stats['ours'] - rss_stats['bare']:.0f} MB, "
              f"reference {rss_stats['reference'] - rss_stats['bare']:.0f} MB")
    print(f"p99 tables: ours {res['tables']['ours']}\n            reference {res['tables']['reference']}")


if __name__ == "__main__":
    main()
