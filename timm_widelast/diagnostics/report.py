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
from .extract import DTYPES, LayerTokens, sweep_layers
from .pca import DatasetPCA
from .sep import DEFAULT_LEVELS, PERMUTATION_SEED, PERMUTATIONS, SEPAccumulator
from .svd import DEFAULT_THRESHOLDS, check_thresholds, energy_ranks, singular_energies

log = logging.getLogger(__name__)
SCHEMA = "timm-widelast/sep-report/v1"
SWEEP_SCHEMA = "timm-widelast/sep-sweep/v1"
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


def _check_settings(thresholds, percentiles, dtype, on_bad_image, pass2, batch_size) -> tuple[float, ...]:
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
    return thresholds


class _LayerStats:
    """Everything one tapped layer accumulates: PCA second moment, SEP sums, per-image results."""

    def __init__(self, dim: int, centre: bool, thresholds: Sequence[float], sep_mode: str,
                 sep_levels: Sequence[float], permutations: int, permutation_seed: int):
        self.pca = DatasetPCA(dim, centre, thresholds)
        self.sep = SEPAccumulator(dim, sep_mode, sep_levels, permutations, permutation_seed)
        self.cache: Optional[_TokenCache] = None
        self.svd: list[np.ndarray] = []
        self.sep_d: list[np.ndarray] = []
        self.curves: list[torch.Tensor] = []

    def pass1(self, tokens: torch.Tensor, thresholds: Sequence[float]) -> None:
        if self.cache is not None:
            self.cache.write(tokens)
        tokens = tokens.to(torch.float64)  # once for all three statistics (each would cast its own copy)
        self.svd.append(energy_ranks(singular_energies(tokens), thresholds).cpu().numpy())
        self.sep_d.append(self.sep.update(tokens))
        self.pca.update(tokens)


def _analyse(model: nn.Module, images: Any, layers: Sequence[int | str | None], *, token_policy: str = "patch",
             thresholds: Sequence[float] = DEFAULT_THRESHOLDS, percentiles: Sequence[float] = (99, 50),
             centre: bool = False, sep_mode: str = "full", sep_levels: Sequence[float] = DEFAULT_LEVELS,
             permutations: int = PERMUTATIONS, permutation_seed: int = PERMUTATION_SEED, batch_size: int = 32,
             num_workers: int = 0, device: str | torch.device | None = None, dtype: str = "float32",
             num_images: Optional[int] = None, on_bad_image: str = "skip", pass2: str = "auto",
             cache_limit_gb: float = 4.0, cache_dir: Optional[str] = None, progress: bool = True,
             meta: Optional[dict] = None) -> list[dict]:
    """One pass over the images for every layer in ``layers``; one report dict per layer."""
    thresholds = _check_settings(thresholds, percentiles, dtype, on_bad_image, pass2, batch_size)
    rank, world, comm_device = _dist()
    main = rank == 0
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    extractor = LayerTokens(model, layers, token_policy)

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

    def new_stats(dim: int) -> _LayerStats:
        return _LayerStats(dim, centre, thresholds, sep_mode, sep_levels, permutations, permutation_seed)

    start = time.perf_counter()
    stats: Optional[list[_LayerStats]] = None
    ids: list[torch.Tensor] = []
    bad_images: list[tuple[int, str]] = []
    shapes: Optional[list[tuple[int, int]]] = None
    # ---- pass 1: SVD ranks, SEP, second moments (and the token cache), every layer from one forward ----
    for idx, x, bad in batches("sep pass 1"):
        for i, err in bad:
            bad_images.append((i, err))
            if on_bad_image == "skip":
                log.warning("skipping unreadable image %s", err)
        if bad and on_bad_image == "stop":
            break
        if x is None:
            continue
        per_layer = extractor(x)
        if stats is None:
            shapes = [tuple(t.shape[1:]) for t in per_layer]
            stats = [new_stats(s[1]) for s in shapes]
            cache_bytes = sum(4 * math.prod(s) for s in shapes) * len(own)
            if pass2 == "cache" or (pass2 == "auto" and cache_bytes <= cache_limit_gb * 2**30):
                for st in stats:
                    st.cache = _TokenCache(cache_dir)
        for tokens, shape in zip(per_layer, shapes):
            if tuple(tokens.shape[1:]) != shape:
                raise UserError(f"token shape changed from {shape} to {tuple(tokens.shape[1:])}; "
                                "fix: use one input size for all images (the model's own preprocessing does)")
        ids.append(idx)
        for st, tokens in zip(stats, per_layer):
            st.pass1(tokens, thresholds)

    # ---- combine processes ----
    infos = _all_gather({"shapes": shapes, "bad": bad_images}, world)
    seen = {tuple(info["shapes"]) for info in infos if info["shapes"] is not None}
    all_bad = sorted(b for info in infos for b in info["bad"])
    if on_bad_image == "stop" and all_bad:
        raise UserError(f"unreadable image {all_bad[0][1]}; fix: remove it, or pass --on-bad-image skip")
    if not seen:
        raise UserError(f"none of the {total} images could be read; fix: check the image files")
    if len(seen) > 1:
        raise UserError(f"processes saw different token shapes {sorted(seen)}; fix: use one input size")
    shapes = list(seen.pop())
    if stats is None:  # this process got no readable image
        stats = [new_stats(s[1]) for s in shapes]
    for st in stats:
        moment, tsum, count = st.pca.state()
        st.pca.load_state(_all_reduce(moment, comm_device, world), _all_reduce(tsum, comm_device, world),
                          int(_all_reduce(torch.tensor([count], dtype=torch.float64), comm_device, world).item()))
        st.sep.load_state(*[_all_reduce(t, comm_device, world) for t in st.sep.state()])
        st.pca.finalize()
    pass1_s = time.perf_counter() - start

    # ---- pass 2: E_i(d) against each layer's final basis ----
    if stats[0].cache is not None:
        for st in stats:
            for tokens in st.cache.read():
                st.curves.append(st.pca.energy_curves(tokens.to(device)).cpu())
            st.cache.close()
    else:
        for _idx, x, _bad in batches("sep pass 2"):
            if x is not None:
                for st, tokens in zip(stats, extractor(x)):
                    st.curves.append(st.pca.energy_curves(tokens).cpu())
    extractor.remove()  # the caller's model keeps no hooks of ours
    elapsed = time.perf_counter() - start
    local_ids = torch.cat(ids).numpy() if ids else np.zeros(0, dtype=np.int64)
    id_parts = _all_gather(local_ids, world)
    order = np.argsort(np.concatenate(id_parts), kind="stable")  # global image order, whatever the sharding
    merged_ids = np.concatenate(id_parts)[order]
    names = [images.name(int(i)) if hasattr(images, "name") else str(int(i)) for i in merged_ids]

    meta = dict(meta or {})
    model_meta, data_meta = dict(meta.pop("model", {}) or {}), dict(meta.pop("data", {}) or {})
    model_meta.update(meta)  # top-level extras such as {"label": ...} describe the model
    model_meta.setdefault("name", (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
                          or type(model).__name__)
    reports = []
    for k, (st, shape) in enumerate(zip(stats, shapes)):
        dim = shape[1]
        n_levels = len(st.sep.levels)
        local = {
            "svd": np.concatenate(st.svd) if st.svd else np.zeros((0, len(thresholds)), dtype=np.int64),
            "sep": (np.concatenate(st.sep_d) if st.sep_d
                    else np.zeros((0, 1 + len(st.sep.perms), n_levels), dtype=np.int64)),
            "curves": torch.cat(st.curves).numpy() if st.curves else np.zeros((0, dim)),
        }
        local["pca"] = st.pca.required_dims(torch.from_numpy(local["curves"])).numpy()
        parts = _all_gather(local, world)
        merged = {key: np.concatenate([p[key] for p in parts])[order] for key in local}
        curves_np, sep_d = merged["curves"], merged["sep"]
        sep_result = st.sep.result(sep_d)
        reports.append({
            "schema": SCHEMA,
            "model": {**model_meta, "tap": extractor.specs[k].module_name,
                      "num_prefix_tokens": extractor.num_prefix_tokens[k], "layout": extractor.layouts[k],
                      "token_policy": token_policy, "tokens": shape[0], "dim": dim, "dtype": dtype},
            "data": {**data_meta, "num_images": int(len(names)), "requested_images": total,
                     "num_skipped": len(all_bad), "skipped": [err for _, err in all_bad[:100]]},
            "settings": {"thresholds": list(thresholds), "percentiles": [float(q) for q in percentiles],
                         "centre": centre, "sep_mode": sep_mode, "sep_levels": list(st.sep.levels),
                         "permutations": permutations, "permutation_seed": permutation_seed,
                         "pass2": "cache" if st.cache is not None else "rerun",
                         "processes": world, "batch_size": batch_size, "device": str(device),
                         "layers_in_pass": len(stats)},
            "svd": {"ranks": merged["svd"].tolist(), "percentiles": _percentiles(merged["svd"], percentiles)},
            "pca": {"required_dims": merged["pca"].tolist(),
                    "percentiles": _percentiles(merged["pca"], percentiles),
                    "eigenvalues": st.pca.eigenvalues.tolist(),
                    "energy_quantiles": {f"{q:g}": np.percentile(curves_np, q, axis=0).tolist()
                                         for q in CURVE_QUANTILES},
                    "energy_mean": curves_np.mean(0).tolist(),
                    "sample_curves": curves_np[:SAMPLE_CURVES].tolist()},
            "sep": {**sep_result, "per_image_d": sep_d[:, 0].tolist(),
                    "per_image_b": (sep_d[:, 0] / st.sep.bins).tolist(),
                    "per_image_b_mean": (sep_d[:, 0] / st.sep.bins).mean(0).tolist()},
            "images": names,
            "timing": {"seconds": elapsed, "pass1_seconds": pass1_s, "images_per_second": len(names) / elapsed,
                       "shared_by_layers": len(stats)},
        })
    return reports


def run_report(model: nn.Module, images: Any, out_dir: Optional[str | os.PathLike] = None, *,
               layer: int | str | None = None, token_policy: str = "patch",
               thresholds: Sequence[float] = DEFAULT_THRESHOLDS, percentiles: Sequence[float] = (99, 50),
               centre: bool = False, sep_mode: str = "full", sep_levels: Sequence[float] = DEFAULT_LEVELS,
               permutations: int = PERMUTATIONS, permutation_seed: int = PERMUTATION_SEED, batch_size: int = 32,
               num_workers: int = 0, device: str | torch.device | None = None, dtype: str = "float32",
               num_images: Optional[int] = None, on_bad_image: str = "skip", pass2: str = "auto",
               cache_limit_gb: float = 4.0, cache_dir: Optional[str] = None, progress: bool = True,
               plots: bool = True, meta: Optional[dict] = None) -> dict:
    """Compute the SVD / PCA / SEP diagnostics of ``model`` on ``images`` and return the report dict.

    ``images``: a folder path, a tensor [n, 3, H, W] (already preprocessed), or a dataset
    yielding ``(index, tensor | None, error | None)`` (see ``diagnostics.data``).
    With ``out_dir`` the main process writes report.json, report.md and the PNG plots there.
    ``meta``: ``{"label": ...}`` (shown in tables), or ``{"model": {...}, "data": {...}}`` merged
    into those report sections. The model is moved to ``device``/``dtype`` in place.
    ``permutations`` random channel orders (numpy ``default_rng(permutation_seed)``, as the
    authors' release: 50 and 2026) give the SEP robustness check; 0 skips it.
    """
    # every other keyword is an analysis setting, passed through as is (a new one fails loudly if _analyse lacks it)
    settings = {k: v for k, v in locals().items() if k not in ("model", "images", "out_dir", "layer", "plots")}
    report = _analyse(model, images, [layer], **settings)[0]
    if out_dir is not None and _dist()[0] == 0:
        write_report(report, out_dir, plots=plots)
    return report


def run_sweep(model: nn.Module, images: Any, out_dir: Optional[str | os.PathLike] = None, *,
              layers: Sequence[int | str] = ("all",), plots: bool = True, layer_plots: bool = False,
              **kwargs: Any) -> dict:
    """Per-layer sweep: the report of every listed layer from ONE pass over the images.

    ``layers``: ``["all"]`` (every block) or block indices / module names. Memory grows as
    O(L * D^2) (one second moment and one SEP sum per layer). Returns the sweep dict
    (``schema`` SWEEP_SCHEMA) with the per-layer reports under ``"reports"``; with ``out_dir``
    writes report.md (one row per layer), sweep.json, depth.png and ``layers/NAME/`` (one
    ordinary report folder per layer; their plots only with ``layer_plots``).
    Other keyword arguments are :func:`run_report`'s.
    """
    reports = _analyse(model, images, sweep_layers(model, list(layers)), **kwargs)
    sweep = sweep_summary(reports)
    if out_dir is not None and _dist()[0] == 0:
        write_sweep(sweep, reports, out_dir, plots=plots, layer_plots=layer_plots)
    return {**sweep, "reports": reports}


def sweep_summary(reports: Sequence[dict]) -> dict:
    """One row per layer: module name, width, rank percentiles, SEP b of the mean curve."""
    first = reports[0]
    rows = [{"layer": r["model"]["tap"], "dim": r["model"]["dim"], "tokens": r["model"]["tokens"],
             "svd_percentiles": r["svd"]["percentiles"], "pca_percentiles": r["pca"]["percentiles"],
             "sep_d": r["sep"]["d"], "sep_b": r["sep"]["b"], "sep_per_image_b_mean": r["sep"]["per_image_b_mean"],
             "report": f"layers/{r['model']['tap']}"} for r in reports]
    return {"schema": SWEEP_SCHEMA, "model": {k: v for k, v in first["model"].items()
                                              if k not in ("tap", "dim", "tokens", "num_prefix_tokens", "layout")},
            "data": first["data"], "settings": first["settings"], "layers": rows, "timing": first["timing"]}


def load_report(path: str | os.PathLike) -> dict:
    """Read a report.json (or the folder holding it) and check its schema."""
    path = Path(path)
    if path.is_dir() and not (path / "report.json").is_file() and (path / "sweep.json").is_file():
        raise UserError(f"{str(path)!r} is a per-layer sweep, not one report; "
                        f"fix: pass one of its layers, e.g. {str(path / 'layers' / '<module name>')!r}")
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


def short_model_name(name: str) -> str:
    """A label for tables and plots: ``local-dir:/a/b/run`` -> ``run``, ``hf-hub:org/x`` -> ``x``."""
    name = str(name)
    for prefix in ("local-dir:", "hf-hub:", "hf_hub:", "timm/"):
        if name.startswith(prefix):
            rest = name[len(prefix):].rstrip("/\\")
            return Path(rest).name or rest
    return name


def model_label(report: dict) -> str:
    """The report's label (or model name), shortened when it is a path."""
    return short_model_name(report["model"].get("label") or report["model"].get("name") or "model")


def paper_int(value: float) -> int:
    """How the authors' tables print a percentile over images: ``int(round(p))`` (half to even)."""
    return int(round(float(value)))


def _rank_columns(thresholds: Sequence[float]) -> list[str]:
    return [f"SVD {100 * t:g}" for t in thresholds] + [f"PCA {100 * t:g}" for t in thresholds]


def _rank_values(report: dict, percentile: float) -> list[float]:
    q = f"{percentile:g}"
    svd = report["svd"]["percentiles"].get(q) or np.percentile(report["svd"]["ranks"], percentile, axis=0).tolist()
    pca = (report["pca"]["percentiles"].get(q)
           or np.percentile(report["pca"]["required_dims"], percentile, axis=0).tolist())
    return list(svd) + list(pca)


def markdown_tables(reports: Sequence[dict], percentile: float = 99, sep: bool = True,
                    row_label: Callable[[dict], str] = model_label, first_column: str = "model") -> str:
    """The paper's tables: SVD/PCA ranks at a percentile over images (printed as ``int(round(p))``,
    as the release prints them; report.json keeps the floats), and SEP d / b rows."""
    q = f"{percentile:g}"
    cols = _rank_columns(reports[0]["settings"]["thresholds"])
    lines = [f"Ranks needed for each energy threshold, {q}th percentile over images "
             "(numpy percentile, linear; shown as int(round(p)) like the paper).", "",
             f"| {first_column} | D | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in reports:
        vals = " | ".join(str(paper_int(v)) for v in _rank_values(r, percentile))
        lines.append(f"| {row_label(r)} | {r['model']['dim']} | {vals} |")
    if not sep:
        return "\n".join(lines) + "\n"
    levels = reports[0]["sep"]["levels"]
    lines += ["", f"SEP ({reports[0]['sep']['mode']} spectrum): leading channel-frequency bins d_a the mean "
              "curve needs to reach a% of the energy, and b_a = d_a / bins.", "",
              f"| {first_column} | row | " + " | ".join(f"{a:g}%" for a in levels) + " |",
              "|---|---|" + "---|" * len(levels)]
    for r in reports:
        s = r["sep"]
        lines.append(f"| {row_label(r)} | d | " + " | ".join(str(v) for v in s["d"]) + " |")
        lines.append(f"| {row_label(r)} | b | " + " | ".join(f"{v:.3f}" for v in s["b"]) + " |")
    return "\n".join(lines) + "\n"


def _levels_row(label: str, values: Sequence[float], fmt: str = "{:.3f}") -> str:
    return f"| {label} | " + " | ".join(fmt.format(v) for v in values) + " |"


def robustness_markdown(report: dict) -> list[str]:
    """The channel-permutation check, with the release's statistic and ours labelled apart."""
    s = report["sep"]
    perm, levels = s.get("permutations"), s["levels"]
    if not perm:
        return []
    head = "| | " + " | ".join(f"{a:g}%" for a in levels) + " |"
    rule = "|---|" + "---|" * len(levels)
    lines = [f"Channel-permutation check: {perm['count']} random channel orders from "
             f"`numpy.random.default_rng({perm['seed']})` (the release uses 50 and seed 2026).", "", head, rule]
    pi = perm.get("per_image")
    if pi:
        lines += [_levels_row("natural order: mean over images of per-image b_a (release statistic)",
                              pi["natural_mean"]),
                  _levels_row("permuted: mean over permutations of that statistic", pi["permuted_mean"]),
                  _levels_row("delta permuted - natural: mean over permutations", pi["delta_mean"], "{:+.4f}"),
                  _levels_row("delta: std over permutations", pi["delta_std"], "{:.4f}"),
                  _levels_row("delta: 5th / 95th percentile over permutations",
                              [f"{lo:+.4f} / {hi:+.4f}" for lo, hi in zip(pi["delta_p05"], pi["delta_p95"])], "{}")]
    lines += [_levels_row("natural order: b_a of the mean curve (ours, the SEP table above)", s["b"]),
              _levels_row("permuted: b_a of the mean curve, min - max",
                          [f"{lo:.3f} - {hi:.3f}" for lo, hi in zip(perm["b_min"], perm["b_max"])], "{}")]
    if pi:
        lines += ["", f"Curve-L1 distance (release): mean over bins of |permuted mean curve - natural mean curve| "
                      f"/ 100, mean curves over images: {pi['curve_l1_mean']:.5f} +/- {pi['curve_l1_std']:.5f} "
                      "(mean +/- std over permutations)."]
    return lines + [""]


def _run_lines(m: dict, d: dict, s: dict) -> list[str]:
    """The images / PCA / dtype lines that head a report.md and a sweep's report.md."""
    return [f"- images: {d['num_images']} analysed, {d['num_skipped']} skipped (unreadable)"
            + (f"; source {d['source']}" if d.get("source") else ""),
            f"- PCA second moment {'centred' if s['centre'] else 'uncentred'}; dtype {m['dtype']}; "
            f"{s['processes']} process(es)"]


def report_markdown(report: dict, plots: bool = True) -> str:
    """report.md: the tables plus how the numbers were made."""
    m, d, s = report["model"], report["data"], report["settings"]
    parts = [f"# SEP report: {model_label(report)}", "",
             f"- tokens: `{m['tap']}` output, {m['tokens']} tokens x {m['dim']} channels "
             f"({m['token_policy']} tokens, {m['num_prefix_tokens']} prefix tokens dropped)"
             if m["token_policy"] == "patch" else
             f"- tokens: `{m['tap']}` output, {m['tokens']} tokens x {m['dim']} channels (all tokens)",
             *_run_lines(m, d, s), ""]
    for k, q in enumerate(s["percentiles"]):
        parts += [markdown_tables([report], q, sep=k == len(s["percentiles"]) - 1), ""]
    b = np.asarray(report["sep"]["per_image_b"])
    if len(b):
        parts += ["Per-image SEP bandwidths b_a (natural channel order), mean over images: "
                  + ", ".join(f"{a:g}%: {v:.3f}" for a, v in zip(report["sep"]["levels"], b.mean(0))), ""]
    parts += robustness_markdown(report)
    if plots:
        parts += ["Plots: `sep_curve.png`, `rank_hist.png`, `pca_energy.png`.", ""]
    return "\n".join(parts)


def write_report(report: dict, out_dir: str | os.PathLike, plots: bool = True) -> Path:
    """Write report.json, report.md and (optionally) the PNG plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    atomic_write(out / "report.md", report_markdown(report, plots))
    if plots:
        from .plots import plot_report

        plot_report(report, out)
    return out


def sweep_markdown(sweep: dict, reports: Sequence[dict], plots: bool = True) -> str:
    """The sweep's report.md: one row per layer, labelled by module name."""
    m, d, s = sweep["model"], sweep["data"], sweep["settings"]
    parts = [f"# Per-layer SEP sweep: {model_label(sweep)}", "",
             f"- {len(reports)} layers from one pass over the images; each layer's full report is in "
             "`layers/<module name>/`",
             *_run_lines(m, d, s), ""]
    for k, q in enumerate(s["percentiles"]):
        parts += [markdown_tables(reports, q, sep=k == len(s["percentiles"]) - 1,
                                  row_label=lambda r: r["model"]["tap"], first_column="layer"), ""]
    if plots:
        parts += ["Plot: `depth.png` (ranks at the first percentile and SEP b_a against depth).", ""]
    return "\n".join(parts)


def write_sweep(sweep: dict, reports: Sequence[dict], out_dir: str | os.PathLike, plots: bool = True,
                layer_plots: bool = False) -> Path:
    """Write the sweep folder: report.md, sweep.json, depth.png and one report folder per layer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for r in reports:
        write_report(r, out / "layers" / r["model"]["tap"], plots=plots and layer_plots)
    atomic_write(out / "sweep.json", json.dumps(sweep, indent=1))
    atomic_write(out / "report.md", sweep_markdown(sweep, reports, plots))
    if plots:
        from .plots import plot_depth

        plot_depth(sweep, out / "depth.png")
    return out
