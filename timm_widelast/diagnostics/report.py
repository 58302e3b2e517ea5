"""`run_report`: stream images through a model once (or twice) and write the SEP report folder.

Pass 1 runs the model to the tapped block and, per batch, computes the sample-wise
SVD ranks, the SEP curves and the dataset second moment. Pass 2 needs the final PCA
basis, so it measures E_i(d) on the same tokens again: read back from a temporary
float32 disk cache (exact: the very same tokens, and memory stays O(D^2)), or by
re-running the model when the cache would be too large. Under ``accelerate launch``
each process takes every k-th image; sums are all-reduced and per-image results gathered,
so the numbers equal a single-process run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_write
from .data import ImageFiles, collate, list_images
from .extract import DTYPES, TokenExtractor
from .pca import DatasetPCA
from .sep import DEFAULT_LEVELS, SEPAccumulator
from .svd import DEFAULT_THRESHOLDS, check_thresholds, energy_ranks, singular_energies

log = logging.getLogger(__name__)
SCHEMA = "timm-widelast/sep-report/v1"
PASS2_MODES = ("auto", "cache", "rerun")
CURVE_QUANTILES = (0, 1, 5, 25, 50, 75, 100)  # percentiles of E_i(d) over images, kept for the plots
SAMPLE_CURVES = 16  # a few individual E_i(d) curves, kept for the plots


class TensorImages(torch.utils.data.Dataset):
    """Already preprocessed images [n, 3, H, W] as an image source."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return str(index)

    def __getitem__(self, index: int):
        return index, self.images[index], None


def model_transform(model: nn.Module) -> Callable:
    """The model's own eval preprocessing (timm.data.resolve_data_config + create_transform)."""
    from timm.data import create_transform

    return create_transform(**model_data_config(model))


def model_data_config(model: nn.Module) -> dict:
    """timm's resolve_data_config, with the input size the model was built for.

    A model created with ``img_size=...`` keeps its registered pretrained config (224 px),
    which its fixed-size patch embedding would then refuse.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    fixed = size is not None and not getattr(embed, "dynamic_img_size", False)
    if fixed and tuple(size) != tuple(cfg["input_size"][1:]):
        cfg["input_size"] = (cfg["input_size"][0], *size)
        cfg["crop_pct"] = 1.0  # resize straight to the model's size: no centre crop beyond it
    return cfg


def _dist():
    """(process index, process count, device for collectives) of the current accelerate/torch run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
    return 0, 1, torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, comm_device: torch.device, world: int) -> torch.Tensor:
    if world == 1:
        return tensor
    t = tensor.to(comm_device)
    torch.distributed.all_reduce(t)
    return t.cpu()


def _all_gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


class _TokenCache:
    """Batches of float32 tokens written to an unlinked temporary file and read back in order."""

    def __init__(self, directory: Optional[str]):
        self.file = tempfile.TemporaryFile(dir=directory)
        self.shapes: list[tuple[int, ...]] = []

    def write(self, tokens: torch.Tensor) -> None:
        arr = tokens.detach().to("cpu", torch.float32).contiguous().numpy()
        self.file.write(arr.tobytes())
        self.shapes.append(arr.shape)

    def read(self) -> Iterator[torch.Tensor]:
        self.file.seek(0)
        for shape in self.shapes:
            buf = bytearray(4 * math.prod(shape))
            self.file.readinto(buf)
            yield torch.frombuffer(buf, dtype=torch.float32).reshape(shape)

    def close(self) -> None:
        self.file.close()


def _percentiles(values: np.ndarray, qs: Sequence[float]) -> dict[str, list[float]]:
    """numpy percentile (linear) over images, per threshold column."""
    return {f"{q:g}": np.percentile(values, q, axis=0).tolist() for q in qs}


def run_report(model: nn.Module, images: Any, out_dir: Optional[str | os.PathLike] = None, *,
               layer: int | str | None = None, token_policy: str = "patch",
               thresholds: Sequence[float] = DEFAULT_THRESHOLDS, percentiles: Sequence[float] = (99, 50),
               centre: bool = False, sep_mode: str = "full", sep_levels: Sequence[float] = DEFAULT_LEVELS,
               permutations: int = 3, seed: int = 0, batch_size: int = 32, num_workers: int = 0,
               device: str | torch.device | None = None, dtype: str = "float32", num_images: Optional[int] = None,
               on_bad_image: str = "skip", pass2: str = "auto", cache_limit_gb: float = 4.0,
               cache_dir: Optional[str] = None, progress: bool = True, plots: bool = True,
               meta: Optional[dict] = None) -> dict:
    """Compute the SVD / PCA / SEP diagnostics of ``model`` on ``images`` and return the report dict.

    ``images``: a folder path, a tensor [n, 3, H, W] (already preprocessed), or a dataset
    yielding ``(index, tensor | None, error | None)`` (see ``diagnostics.data``).
    With ``out_dir`` the main process writes report.json, report.md and the PNG plots there.
    ``meta``: ``{"label": ...}`` (shown in tables), or ``{"model": {...}, "data": {...}}`` merged
    into those report sections. The model is moved to ``device``/``dtype`` in place.
    """
    thresholds = check_thresholds(thresholds)
    for q in percentiles:
        if not 0 <= float(q) <= 100:
            raise UserError(f"percentile {q} is outside [0, 100]; fix: use e.g. --percentiles 99 50")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; fix: use one of {', '.join(DTYPES)}")
    if on_bad_image not in ("skip", "stop"):
        raise UserError(f"unknown --on-bad-image {on_bad_image!r}; fix: use skip or stop")
    if pass2 not in PASS2_MODES:
        raise UserError(f"unknown pass-2 mode {pass2!r}; fix: use one of {', '.join(PASS2_MODES)}")
    if batch_size < 1:
        raise UserError(f"batch size {batch_size} must be at least 1; fix: pass --batch-size 32")

    rank, world, comm_device = _dist()
    main = rank == 0
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    extractor = TokenExtractor(model, layer, token_policy)

    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        images = ImageFiles(list_images(root), model_transform(model), root)
    elif torch.is_tensor(images):
        images = TensorImages(images)
    total = len(images) if num_images is None else min(len(images), int(num_images))
    if total == 0:
        raise UserError("no images to analyse; fix: pass a non-empty image source (and --num-images > 0)")
    own = list(range(rank, total, world))  # every k-th image, so shards differ by at most one image
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, own), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=collate)
    from tqdm.auto import tqdm

    def batches(desc: str):
        for idx, x, bad in tqdm(loader, desc=desc, disable=not (progress and main), leave=False):
            yield idx, (None if x is None else x.to(device=device, dtype=DTYPES[dtype], non_blocking=True)), bad

    start = time.perf_counter()
    pca = sep = cache = None
    ids: list[torch.Tensor] = []
    svd_ranks: list[np.ndarray] = []
    sep_dims: list[np.ndarray] = []
    bad_images: list[tuple[int, str]] = []
    token_shape: Optional[tuple[int, int]] = None
    # ---- pass 1: SVD ranks, SEP, second moment (and the token cache) ----
    for idx, x, bad in batches("sep pass 1"):
        for i, err in bad:
            bad_images.append((i, err))
            if on_bad_image == "skip":
                log.warning("skipping unreadable image %s", err)
        if bad and on_bad_image == "stop":
            break
        if x is None:
            continue
        tokens = extractor(x)
        if pca is None:
            token_shape = tuple(tokens.shape[1:])
            pca = DatasetPCA(token_shape[1], centre, thresholds)
            sep = SEPAccumulator(token_shape[1], sep_mode, sep_levels, permutations, seed)
            cache_bytes = 4 * math.prod(token_shape) * len(own)
            if pass2 == "cache" or (pass2 == "auto" and cache_bytes <= cache_limit_gb * 2**30):
                cache = _TokenCache(cache_dir)
        if tuple(tokens.shape[1:]) != token_shape:
            raise UserError(f"token shape changed from {token_shape} to {tuple(tokens.shape[1:])}; "
                            "fix: use one input size for all images (the model's own preprocessing does)")
        ids.append(idx)
        if cache is not None:
            cache.write(tokens)
        tokens = tokens.to(torch.float64)  # once for all three statistics (each would cast its own copy)
        svd_ranks.append(energy_ranks(singular_energies(tokens), thresholds).cpu().numpy())
        sep_dims.append(sep.update(tokens))
        pca.update(tokens)

    # ---- combine processes ----
    infos = _all_gather({"shape": token_shape, "bad": bad_images}, world)
    shapes = {info["shape"] for info in infos if info["shape"] is not None}
    all_bad = sorted(b for info in infos for b in info["bad"])
    if on_bad_image == "stop" and all_bad:
        raise UserError(f"unreadable image {all_bad[0][1]}; fix: remove it, or pass --on-bad-image skip")
    if not shapes:
        raise UserError(f"none of the {total} images could be read; fix: check the image files")
    if len(shapes) > 1:
        raise UserError(f"processes saw different token shapes {sorted(shapes)}; fix: use one input size")
    token_shape = shapes.pop()
    dim = token_shape[1]
    if pca is None:  # this process got no readable image
        pca = DatasetPCA(dim, centre, thresholds)
        sep = SEPAccumulator(dim, sep_mode, sep_levels, permutations, seed)
    moment, tsum, count = pca.state()
    pca.load_state(_all_reduce(moment, comm_device, world), _all_reduce(tsum, comm_device, world),
                   int(_all_reduce(torch.tensor([count], dtype=torch.float64), comm_device, world).item()))
    curve_sum, tok_count = sep.state()
    sep.load_state(_all_reduce(curve_sum, comm_device, world), _all_reduce(tok_count, comm_device, world))
    pca.finalize()
    pass1_s = time.perf_counter() - start

    # ---- pass 2: E_i(d) against the final basis ----
    curves: list[torch.Tensor] = []
    if cache is not None:
        for tokens in cache.read():
            curves.append(pca.energy_curves(tokens.to(device)).cpu())
        cache.close()
    else:
        for _idx, x, _bad in batches("sep pass 2"):
            if x is not None:
                curves.append(pca.energy_curves(extractor(x)).cpu())
    empty_t = np.zeros((0, len(thresholds)), dtype=np.int64)
    local = {
        "ids": torch.cat(ids).numpy() if ids else np.zeros(0, dtype=np.int64),
        "svd": np.concatenate(svd_ranks) if svd_ranks else empty_t,
        "sep": np.concatenate(sep_dims) if sep_dims else np.zeros((0, len(sep.levels)), dtype=np.int64),
        "curves": torch.cat(curves).numpy() if curves else np.zeros((0, dim)),
    }
    local["pca"] = pca.required_dims(torch.from_numpy(local["curves"])).numpy() if curves else empty_t
    parts = _all_gather(local, world)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in local}
    order = np.argsort(merged["ids"], kind="stable")  # global image order, whatever the sharding
    merged = {k: v[order] for k, v in merged.items()}
    elapsed = time.perf_counter() - start

    meta = dict(meta or {})
    model_meta, data_meta = dict(meta.pop("model", {}) or {}), dict(meta.pop("data", {}) or {})
    model_meta.update(meta)  # top-level extras such as {"label": ...} describe the model
    model_meta.setdefault("name", (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
                          or type(model).__name__)
    names = [images.name(int(i)) if hasattr(images, "name") else str(int(i)) for i in merged["ids"]]
    curves_np = merged["curves"]
    sep_result = sep.result()
    report = {
        "schema": SCHEMA,
        "model": {**model_meta, "tap": extractor.spec.module_name,
                  "num_prefix_tokens": extractor.num_prefix_tokens, "layout": extractor.layout,
                  "token_policy": token_policy, "tokens": token_shape[0], "dim": dim, "dtype": dtype},
        "data": {**data_meta, "num_images": int(len(names)), "requested_images": total,
                 "num_skipped": len(all_bad), "skipped": [err for _, err in all_bad[:100]]},
        "settings": {"thresholds": list(thresholds), "percentiles": [float(q) for q in percentiles],
                     "centre": centre, "sep_mode": sep_mode, "sep_levels": list(sep.levels),
                     "permutations": permutations, "seed": seed, "pass2": "cache" if cache is not None else "rerun",
                     "processes": world, "batch_size": batch_size, "device": str(device)},
        "svd": {"ranks": merged["svd"].tolist(), "percentiles": _percentiles(merged["svd"], percentiles)},
        "pca": {"required_dims": merged["pca"].tolist(), "percentiles": _percentiles(merged["pca"], percentiles),
                "eigenvalues": pca.eigenvalues.tolist(),
                "energy_quantiles": {f"{q:g}": np.percentile(curves_np, q, axis=0).tolist() for q in CURVE_QUANTILES},
                "energy_mean": curves_np.mean(0).tolist(),
                "sample_curves": curves_np[:SAMPLE_CURVES].tolist()},
        "sep": {**sep_result, "per_image_d": merged["sep"].tolist(),
                "per_image_b": (merged["sep"] / sep.bins).tolist()},
        "images": names,
        "timing": {"seconds": elapsed, "pass1_seconds": pass1_s, "images_per_second": len(names) / elapsed},
    }
    if out_dir is not None and main:
        write_report(report, out_dir, plots=plots)
    return report


def load_report(path: str | os.PathLike) -> dict:
    """Read a report.json (or the folder holding it) and check its schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise UserError(f"no report at {str(path)!r}; "
                        "fix: pass a folder written by `timm-widelast sep` or its report.json")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{str(path)!r} is not valid JSON ({err}); fix: re-run `timm-widelast sep`") from err
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise UserError(f"{str(path)!r} is not a {SCHEMA} report; fix: re-run `timm-widelast sep`")
    return report


def model_label(report: dict) -> str:
    return str(report["model"].get("label") or report["model"].get("name") or "model")


def markdown_tables(reports: Sequence[dict], percentile: float = 99, sep: bool = True) -> str:
    """The paper's tables: SVD/PCA ranks at a percentile over images, and SEP d / b rows."""
    q = f"{percentile:g}"
    thresholds = reports[0]["settings"]["thresholds"]
    cols = [f"SVD {100 * t:g}" for t in thresholds] + [f"PCA {100 * t:g}" for t in thresholds]
    lines = [f"Ranks needed for each energy threshold, {q}th percentile over images "
             "(numpy percentile, linear).", "",
             "| model | D | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in reports:
        svd = r["svd"]["percentiles"].get(q) or np.percentile(r["svd"]["ranks"], percentile, axis=0).tolist()
        pca = r["pca"]["percentiles"].get(q) or np.percentile(r["pca"]["required_dims"], percentile, axis=0).tolist()
        vals = " | ".join(f"{v:g}" for v in list(svd) + list(pca))
        lines.append(f"| {model_label(r)} | {r['model']['dim']} | {vals} |")
    if not sep:
        return "\n".join(lines) + "\n"
    levels = reports[0]["sep"]["levels"]
    lines += ["", f"SEP ({reports[0]['sep']['mode']} spectrum): leading channel-frequency bins d_a the mean "
              "curve needs to reach a% of the energy, and b_a = d_a / bins.", "",
              "| model | row | " + " | ".join(f"{a:g}%" for a in levels) + " |",
              "|---|---|" + "---|" * len(levels)]
    for r in reports:
        s = r["sep"]
        lines.append(f"| {model_label(r)} | d | " + " | ".join(str(v) for v in s["d"]) + " |")
        lines.append(f"| {model_label(r)} | b | " + " | ".join(f"{v:.3f}" for v in s["b"]) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(report: dict) -> str:
    """report.md: the tables plus how the numbers were made."""
    m, d, s = report["model"], report["data"], report["settings"]
    parts = [f"# SEP report: {model_label(report)}", "",
             f"- tokens: `{m['tap']}` output, {m['tokens']} tokens x {m['dim']} channels "
             f"({m['token_policy']} tokens, {m['num_prefix_tokens']} prefix tokens dropped)"
             if m["token_policy"] == "patch" else
             f"- tokens: `{m['tap']}` output, {m['tokens']} tokens x {m['dim']} channels (all tokens)",
             f"- images: {d['num_images']} analysed, {d['num_skipped']} skipped (unreadable)"
             + (f"; source {d['source']}" if d.get("source") else ""),
             f"- PCA second moment {'centred' if s['centre'] else 'uncentred'}; dtype {m['dtype']}; "
             f"{s['processes']} process(es)", ""]
    for k, q in enumerate(s["percentiles"]):
        parts += [markdown_tables([report], q, sep=k == len(s["percentiles"]) - 1), ""]
    perm = report["sep"].get("permutations")
    if perm:
        parts += [f"Channel-permutation check ({perm['count']} random orders): b_a ranges "
                  + ", ".join(f"{a:g}%: {lo:.3f}-{hi:.3f}" for a, lo, hi in
                              zip(report["sep"]["levels"], perm["b_min"], perm["b_max"])), ""]
    b = np.asarray(report["sep"]["per_image_b"])
    if len(b):
        parts += ["Per-image SEP bandwidths b_a (median over images): "
                  + ", ".join(f"{a:g}%: {v:.3f}" for a, v in zip(report["sep"]["levels"], np.median(b, 0))), ""]
    parts += ["Plots: `sep_curve.png`, `rank_hist.png`, `pca_energy.png`.", ""]
    return "\n".join(parts)


def write_report(report: dict, out_dir: str | os.PathLike, plots: bool = True) -> Path:
    """Write report.json, report.md and (optionally) the PNG plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    atomic_write(out / "report.md", report_markdown(report))
    if plots:
        from .plots import plot_report

        plot_report(report, out)
    return out
