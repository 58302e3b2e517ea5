"""Model cards: model statistics, card metadata and rendering through ``ModelCard.from_template``.

Cards are generated from metadata (a training run or the paper's results table); nobody
edits a rendered card by hand. The Jinja2 template ships as package data
(``timm_widelast/templates/model_card.md``).
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..io import atomic_write

TAGS = ["image-classification", "timm", "knowledge-distillation", "vision-transformer"]
LICENSE = "apache-2.0"
PAPER_URL = "https://arxiv.org/abs/2511.15572"
RELEASE_REPO = "Huiyuancs/Encoding_Mismatch"
DEIT_BASES = {192: "timm/deit_tiny_patch16_224.fb_in1k", 384: "timm/deit_small_patch16_224.fb_in1k"}
PLACEHOLDER_REPO = "your-org/your-model"
# Marks the note about the placeholder repo; push drops it once the real repo id is filled in.
NOTE_START, NOTE_END = "<!-- placeholder-repo -->", "<!-- /placeholder-repo -->"


def short_name(ref: str) -> str:
    """A model or run name fit for a label: ``local-dir:/a/b/run`` and ``/a/b/run`` -> ``run``; ``hf-hub:`` dropped."""
    ref = str(ref)
    if ref.startswith("hf-hub:"):
        return ref[len("hf-hub:"):].split("@")[0]
    if ref.startswith("local-dir:"):
        return Path(ref[len("local-dir:"):].rstrip("/")).name or ref
    if ref.startswith(("/", "~", "./", "../")) or (("/" in ref or "\\" in ref) and Path(ref).exists()):
        return Path(ref.rstrip("/")).name or ref
    return ref


def is_deit_sized(model: nn.Module) -> bool:
    """Whether the student keeps DeiT-Tiny's or DeiT-Small's blocks (widths 192 / 384, patch 16)."""
    width = int(model.patch_embed.proj.out_channels)
    return width in DEIT_BASES and tuple(model.patch_embed.patch_size) == (16, 16)


def is_timm_deit(name: str) -> bool:
    """A DeiT of timm's (``deit_small_patch16_224``, ``deit3_...``), not one of our DeiT-derived students."""
    name = name.lower().split(".")[0]
    return name.startswith("deit") and not name.endswith(("_lift", "_widelast"))


def template_path() -> Path:
    """The card template installed with the package."""
    return Path(str(resources.files("timm_widelast") / "templates" / "model_card.md"))


# ----------------------------------------------------------------------------------------------
# Model statistics (timm's cards: Params (M), GMACs, Activations (M))

_ACT_OPS = ("mm", "addmm", "bmm", "convolution", "baddbmm")
_SDPA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_attention_math")


class _ActivationCounter(TorchDispatchMode):
    """Sums output elements of matmul/conv ops, like fvcore's activation count that timm's cards use.

    A fused attention kernel hides the N x N score matrix that an unfused one materialises
    (q @ k^T); it is added back so fused and unfused models count alike.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _ACT_OPS:
            self.count += out.numel()
        elif name in _SDPA_OPS:
            q, k = args[0], args[1]
            self.count += q.numel() + q.shape[:-1].numel() * k.shape[-2]  # output + score matrix
        return out


@dataclass
class ModelStats:
    params_m: float
    gmacs: float
    activations_m: float
    img_size: int


def model_stats(model: nn.Module) -> ModelStats:
    """Parameter count, GMACs and activations (M) of one forward at batch 1, at the model's image size.

    Always counted on a meta-device copy: no compute, and the same count on every host (on
    CPU, fused attention dispatches to kernels FlopCounterMode does not count).
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    size = int(model.patch_embed.img_size[0])
    first = next(model.parameters())
    meta = model if first.device.type == "meta" else copy.deepcopy(model).to("meta")
    was_training = meta.training
    meta.eval()
    x = torch.zeros(1, 3, size, size, device="meta", dtype=first.dtype)
    counter = _ActivationCounter()
    flops = FlopCounterMode(display=False)
    with torch.no_grad(), flops, counter:
        meta(x)
    meta.train(was_training)
    # FlopCounterMode counts a multiply-add as 2 FLOPs; timm's cards report MACs.
    return ModelStats(params / 1e6, flops.get_total_flops() / 2e9, counter.count / 1e6, size)


# ----------------------------------------------------------------------------------------------
# The paper's configurations (arXiv 2511.15572, ImageNet-1k, CaiT-S24 teacher -> DeiT-Tiny student)

PAPER_TABLE: List[Tuple[str, float]] = [
    ("DeiT-Tiny baseline", 74.86),
    ("baseline + SpectralKD (naive, channel-pooled teacher)", 75.07),
    ("Lift + MSE only", 76.61),
    ("Lift + SoftKD + SpectralKD", 77.53),
    ("WideLast + MSE only", 77.15),
    ("WideLast + SoftKD + MSE", 78.23),
    ("Lift alone, no teacher", 75.41),
    ("WideLast alone, no teacher", 75.54),
    ("teacher DeiT-Small -> WideLast + SpecKD", 75.73),
    ("teacher DeiT3-Small-21k -> WideLast + SpecKD", 76.50),
]


@dataclass(frozen=True)
class PaperConfig:
    """One row of the paper's results table that has a Lift / WideLast student."""

    architecture: str
    tag: str
    row: str  # the configuration's name in PAPER_TABLE
    soft_kd: float  # a in the loss
    feature_loss: Optional[str]  # "MSE" / "SpectralKD" / None (no teacher)
    released_file: Optional[str] = None  # file in the authors' Hub release, when weights were released

    @property
    def released(self) -> bool:
        return self.released_file is not None

    @property
    def name(self) -> str:
        """The card's name: a loadable timm name for released weights; for the others, not a timm tag."""
        return f"{self.architecture}.{self.tag}" if self.released else f"{self.architecture}-{self.tag}-not-released"

    @property
    def top1(self) -> float:
        """The published ImageNet-1k top-1, as PAPER_TABLE lists it."""
        return dict(PAPER_TABLE)[self.row]


PAPER_CONFIGS: List[PaperConfig] = [
    PaperConfig("deit_tiny_widelast", "cait_s24_softkd_mse_in1k", "WideLast + SoftKD + MSE", 0.9, "MSE",
                "models/WideLast/pytorch_model.pth"),
    PaperConfig("deit_tiny_widelast", "cait_s24_mse_in1k", "WideLast + MSE only", 0.0, "MSE"),
    PaperConfig("deit_tiny_lift", "cait_s24_softkd_spectralkd_in1k", "Lift + SoftKD + SpectralKD", 0.9,
                "SpectralKD", "models/Lift/pytorch_model.pth"),
    PaperConfig("deit_tiny_lift", "cait_s24_mse_in1k", "Lift + MSE only", 0.0, "MSE"),
    PaperConfig("deit_tiny_lift", "in1k", "Lift alone, no teacher", 0.0, None),
    PaperConfig("deit_tiny_widelast", "in1k", "WideLast alone, no teacher", 0.0, None),
]


# ----------------------------------------------------------------------------------------------
# Card content

@dataclass
class ResultRow:
    name: str
    eval_set: str
    epoch: Any
    top1: Optional[float]
    top5: Optional[float] = None


@dataclass
class CardInfo:
    """Everything a card says; built from a run (export) or from a paper configuration."""

    title: str
    architecture: str
    model_args: Dict[str, Any]
    stats: ModelStats
    num_features: int
    feature_dims: List[int]
    family: str  # "Lift" / "WideLast"
    family_paragraph: str
    dataset_id: str  # e.g. imagenet-1k
    dataset_label: str
    eval_split: str
    results: List[ResultRow]
    recipe: List[Tuple[str, Any]]
    model_ref: str  # what the usage snippets pass to timm.create_model
    pretrained: bool = True
    summary: str = ""
    teacher: Optional[str] = None
    base_model: Optional[str] = None
    paper_card: bool = False
    paper_row: Optional[str] = None  # the row of PAPER_TABLE this model is, bolded in the comparison
    show_paper_table: bool = False
    weights_note: Optional[str] = None
    usage_note: Optional[str] = None
    results_intro: str = ""
    sep: Optional[Dict[str, Any]] = None
    sep_missing: str = "No SEP report was attached to this export (`timm-widelast sep`, then `export --report DIR`)."
    paper_claim: Optional[str] = None  # "the paper reports X; these weights: not measured"
    measured_by: str = "this run's evaluation"  # who measured ``results`` on these weights
    cite_deit: bool = True
    cite_cait: bool = False
    num_classes: int = 1000


_MISMATCH = ("The paper finds that a narrow student with a throw-away linear adapter cannot match a wide teacher's "
             "per-image token subspaces and spread-out channel spectra (\"encoding mismatch\"); ")


def describe_family(model: nn.Module, architecture: str) -> Tuple[str, str]:
    """("Lift" | "WideLast", a short paragraph on how it differs from plain DeiT), read off the model itself."""
    narrow = int(model.patch_embed.proj.out_channels)
    depth = len(model.blocks)
    heads = int(model.blocks[0].attn.num_heads)
    wide = int(model.num_features)
    base = "DeiT-Tiny" if narrow == 192 else ("DeiT-Small" if narrow == 384 else f"a {narrow}-wide DeiT")
    if "lift" in architecture:
        return "Lift", (
            f"Lift keeps all {depth} blocks of {base} (width {narrow}, {heads} heads) and keeps the distillation "
            f"projector at inference: the output of the last block (without the narrow final norm) goes token-wise "
            f"through Linear({narrow}->{wide}, no bias) and LayerNorm({wide}), and the classifier is Linear({wide}, C) "
            f"on the mean of the lifted patch tokens (class token excluded); {base}'s own final norm and {narrow}-wide "
            f"head are not used. {_MISMATCH}keeping the teacher-width endpoint gives the student that capacity.")
    dims = [int(b.proj_in.out_features) for b in model.blocks if hasattr(b, "proj_in")]
    last_heads = int(model.blocks[-1].attn.num_heads)
    widened = sum(1 for b in model.blocks if int(b.norm1.normalized_shape[0]) != narrow)
    schedule = (f"its last block to {wide} wide with {last_heads} heads" if widened == 1 else
                f"its last {widened} blocks through widths {dims}")
    return "WideLast", (
        f"WideLast keeps the first {depth - widened} block{'s' if depth - widened != 1 else ''} of {base} "
        f"(width {narrow}, {heads} heads) and widens only "
        f"{schedule}: a widening block first lifts every token (class token included) with Linear(no bias) + "
        f"LayerNorm, then runs an ordinary pre-norm ViT block at the new width; the final norm and the class-token "
        f"head are {wide} wide. {_MISMATCH}a teacher-width last block gives the student that capacity at little cost.")


def feature_dims(model: nn.Module) -> List[int]:
    """Channels of each feature map that ``features_only=True`` returns."""
    info = getattr(model, "feature_info", None) or []
    return [int(f["num_chs"]) for f in info]


def _fmt(value: Any) -> str:
    """Accuracies with two decimals; missing values as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _fmt_setting(value: Any) -> str:
    """Recipe values as written (lr 0.002 stays 0.002); lists joined."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_setting(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_setting(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def card_data(info: CardInfo):
    """The YAML metadata: library, tags, license, datasets, base_model and the model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    source = {"source_name": "arXiv 2511.15572 (published numbers)", "source_url": PAPER_URL} if info.paper_card else {}
    evals = []
    main = info.results[0] if info.results else None
    if main is not None:
        for metric, value in (("top-1", main.top1), ("top-5", main.top5)):
            if value is None:
                continue
            evals.append(EvalResult(
                task_type="image-classification", task_name="Image Classification",
                dataset_type=info.dataset_id, dataset_name=info.dataset_label, dataset_split=info.eval_split,
                metric_type="accuracy", metric_name=f"{metric} accuracy", metric_value=float(value), **source))
    return ModelCardData(
        library_name="timm",
        license=LICENSE,
        tags=list(TAGS),
        datasets=[info.dataset_id],
        base_model=info.base_model,
        model_name=info.title,
        eval_results=evals or None,
        pipeline_tag="image-classification",
    )


def render_card(info: CardInfo):
    """Render ``info`` into a ``huggingface_hub.ModelCard`` with our template."""
    from huggingface_hub import ModelCard

    feature_example = ", ".join(str(d) for d in info.feature_dims[-1:]) or str(info.num_features)
    grid = info.stats.img_size // int(info.model_args.get("patch_size", 16))
    return ModelCard.from_template(
        card_data(info),
        template_path=str(template_path()),
        title=info.title,
        summary=info.summary,
        paper_card=info.paper_card,
        source_note=f"row \"{info.paper_row}\"" if info.paper_row else "",
        stats=info.stats,
        architecture=info.architecture,
        model_args=info.model_args,
        dataset_label=info.dataset_label,
        teacher=info.teacher,
        weights_note=info.weights_note,
        family=info.family,
        family_paragraph=info.family_paragraph,
        usage_note=info.usage_note,
        model_ref=info.model_ref,
        pretrained=info.pretrained,
        feature_example=f"{feature_example}, {grid}, {grid}",
        num_features=info.num_features,
        recipe=[(k, _fmt_setting(v)) for k, v in info.recipe],
        results_intro=info.results_intro,
        results=[dataclasses.replace(r, top1=_fmt(r.top1), top5=_fmt(r.top5), epoch=_fmt(r.epoch))
                 for r in info.results],
        paper_table=[(n, f"{v:.2f}", n == info.paper_row) for n, v in PAPER_TABLE] if info.show_paper_table else None,
        sep=info.sep,
        sep_missing=info.sep_missing,
        paper_claim=info.paper_claim,
        measured_by=info.measured_by,
        timm_results=info.dataset_id == "imagenet-1k",
        cite_deit=info.cite_deit,
        cite_cait=info.cite_cait,
        top_k=min(5, info.num_classes),  # topk(k=5) fails on a model with fewer classes
    )


def sep_section(report: Dict[str, Any], folder: str, figure: Optional[str], percentile: float = 99) -> Dict[str, Any]:
    """Template data for the SEP report section, read tolerantly from a sep-report/v1 ``report.json``."""
    model = report.get("model", {}) or {}
    settings = report.get("settings", {}) or {}
    q = f"{percentile:g}"
    thresholds = settings.get("thresholds") or []
    rows = []
    for key, label in (("svd", "SVD rank (per image)"), ("pca", "PCA dims (dataset basis)")):
        vals = ((report.get(key) or {}).get("percentiles") or {}).get(q)
        if vals:
            rows.append((label, [f"{v:g}" for v in vals]))
    sep = report.get("sep", {}) or {}
    return {
        "label": short_name(model.get("label") or model.get("name") or "model"),
        "tap": model.get("tap", "endpoint"),
        "dim": model.get("dim", "?"),
        "num_images": (report.get("data", {}) or {}).get("num_images", "?"),
        "folder": folder,
        "percentile": q,
        "thresholds": [f"{100 * float(t):g}%" for t in thresholds],
        "svd_rows": rows if thresholds else [],
        "levels": [f"{float(a):g}%" for a in sep.get("levels", [])],
        "d": [str(v) for v in sep.get("d", [])],
        "b": [f"{float(v):.3f}" for v in sep.get("b", [])],
        "figure": figure,
    }


# ----------------------------------------------------------------------------------------------
# Paper cards

PAPER_RECIPE: List[Tuple[str, Any]] = [
    ("epochs", 300), ("global batch", "2048 (512 per GPU x 4)"), ("optimizer", "AdamW, weight decay 0.05"),
    ("lr", "2e-3 (5e-4 x batch / 512)"), ("schedule", "cosine, 5 warmup epochs from 1e-6, min lr 1e-5"),
    ("label smoothing", 0.1), ("augmentation", "RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, "
                                                "repeated augmentation, no Mixup/CutMix"),
    ("drop path", 0.0), ("precision / seed", "AMP, seed 0"),
    ("EMA", "kept; the raw model's best epoch is reported"), ("eval", "resize 256, center crop 224, bicubic"),
]


def paper_card_info(cfg: PaperConfig) -> CardInfo:
    """Card content for one of the paper's configurations (published numbers, not measured here)."""
    import timm

    import timm_widelast  # noqa: F401  (registers the architectures)

    model = timm.create_model(cfg.architecture, pretrained=False, device="meta")
    family, paragraph = describe_family(model, cfg.architecture)
    teacher = "cait_s24_224.fb_dist_in1k" if cfg.feature_loss else None
    recipe: List[Tuple[str, Any]] = []
    if teacher:
        recipe += [("teacher", f"`{teacher}` (CaiT-S24, 83.5% top-1; endpoint `blocks[23]`, 196x384 patch tokens)"),
                   ("loss", "(1 - a) CE_smooth + a tau^2 KL(batchmean) + l_feat L_feat"),
                   ("soft-KD weight a", cfg.soft_kd), ("temperature tau", 1.0),
                   ("feature loss", f"{cfg.feature_loss} on the "
                                    + ("lifted map" if family == "Lift" else "block-11 patch tokens")),
                   ("feature weight l_feat", 0.2)]
    else:
        recipe += [("teacher", "none (supervised, cross-entropy with label smoothing)")]
    recipe += PAPER_RECIPE
    if cfg.released:
        weights_note = (f"released by the authors as `{cfg.released_file}` in "
                        f"[{RELEASE_REPO}](https://huggingface.co/{RELEASE_REPO}); `timm_widelast` loads it as "
                        f"`{cfg.name}`.")
        usage_note = (f"`'{cfg.name}'` downloads the authors' released checkpoint. Once this card is pushed with "
                      f"an export of those weights, `'hf-hub:<org>/{cfg.name}'` loads it the same way.")
        model_ref, pretrained = cfg.name, True
        # the authors evaluated exactly these weights: their number is a result of this model
        results = [ResultRow(cfg.row, "ImageNet-1k val", 300, cfg.top1, None)]
        intro = ("Published ImageNet-1k top-1 of these released weights, as measured by the authors "
                 "(top-5 not published; epoch = training length, the paper reports the raw model's best epoch).")
        claim, title = None, cfg.name
    else:
        weights_note = ("none: the authors released no weights for this configuration, and this project has not "
                        "trained it. This card documents the configuration only.")
        usage_note = ("No weights exist for this configuration: the snippets build the architecture with random "
                      "weights. Train it with `timm-widelast train`, export it, and pass `'hf-hub:<org>/<name>'` "
                      "with `pretrained=True`.")
        model_ref, pretrained = cfg.architecture, False
        results = []
        intro = "No weights of this configuration exist, so no result is given for them."
        claim = (f"The paper reports {cfg.top1:.2f}% ImageNet-1k top-1 for this configuration "
                 "(arXiv 2511.15572); these weights: not measured.")
        title = f"{cfg.architecture} ({cfg.row}; paper configuration, weights not released)"
    return CardInfo(
        title=title,
        architecture=cfg.architecture,
        model_args={},
        stats=model_stats(model),
        num_features=int(model.num_features),
        feature_dims=feature_dims(model),
        family=family,
        family_paragraph=paragraph,
        dataset_id="imagenet-1k",
        dataset_label="ImageNet-1k",
        eval_split="validation",
        results=results,
        recipe=recipe,
        model_ref=model_ref,
        pretrained=pretrained,
        summary=(f"A {family} DeiT-Tiny student ({cfg.row}) from \"From Per-Image Low-Rank to Encoding Mismatch\" "
                 f"(ICML 2026, arXiv 2511.15572)" + (", distilled from a CaiT-S24 teacher" if teacher else
                                                      ", trained without a teacher") + " on ImageNet-1k."),
        teacher=teacher,
        paper_card=True,
        paper_row=cfg.row,
        show_paper_table=True,
        weights_note=weights_note,
        usage_note=usage_note,
        results_intro=intro,
        paper_claim=claim,
        measured_by="the authors (arXiv 2511.15572)",
        sep_missing=("The paper's diagnostics concern the teachers (for CaiT-S24 at `blocks[23]`: SEP d = "
                     "192/230/270/309/346 of 384 bins for 50/60/70/80/90% energy, b = 0.500/0.599/0.703/0.805/0.901). "
                     "No SEP report of this student is attached; `timm-widelast sep` makes one."),
        cite_deit=True,
        cite_cait=teacher is not None,
    )


def write_paper_cards(out_dir: Path, configs: Sequence[PaperConfig] = PAPER_CONFIGS) -> List[Path]:
    """Render one card per paper configuration into ``out_dir/<name>/README.md`` plus an index README."""
    out_dir = Path(out_dir)
    written = []
    index = ["# Model cards for the paper's configurations", "",
             "Generated by `timm-widelast cards --paper --out hub_cards` (do not edit by hand).",
             "**All numbers are the paper's published ImageNet-1k results (arXiv 2511.15572), "
             "not results measured by this project.**", "",
             "Only the released weights' cards carry a result in their metadata (the authors' evaluation of "
             "those weights); the others state the paper's number as the paper's, with no weights measured.", "",
             "| card | configuration | top-1 (paper) | Params (M) | GMACs | weights |", "|---|---|---|---|---|---|"]
    current = {cfg.name for cfg in configs}
    for old in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        # a card folder this command wrote under an earlier name (e.g. a configuration renamed)
        readme = old / "README.md"
        if (old.is_dir() and old.name not in current and [p.name for p in old.iterdir()] == ["README.md"]
                and "timm-widelast cards --paper" in readme.read_text(encoding="utf-8")):
            shutil.rmtree(old)
    for cfg in configs:
        info = paper_card_info(cfg)
        path = out_dir / cfg.name / "README.md"
        atomic_write(path, str(render_card(info)) + "\n")
        written.append(path)
        index.append(f"| [{cfg.name}]({cfg.name}/README.md) | {cfg.row} | {cfg.top1:.2f} | "
                     f"{info.stats.params_m:.2f} | {info.stats.gmacs:.2f} | "
                     f"{'released by the authors' if cfg.released else 'not released'} |")
    index += ["", "Regenerate after changing `timm_widelast/templates/model_card.md` or "
              "`timm_widelast/hub/cards.py`:", "", "```", "timm-widelast cards --paper --out hub_cards", "```", ""]
    atomic_write(out_dir / "README.md", "\n".join(index))
    return written
