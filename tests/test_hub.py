"""Exports (local-dir / hf-hub round trips), the loader helper, and model cards."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from _folders import make_imagefolder
from _hub_helpers import TINY_KWARGS, eval_data, folder_files, make_run, make_run_and_export, run_cli, top1_top5
from huggingface_hub import ModelCard

from timm_widelast.hub.export import export, load_exported

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
    return make_run_and_export(tmp_path_factory.mktemp("hub"))


def _logits(model, seed: int = 0) -> torch.Tensor:
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_export_layout_and_local_dir_round_trip(run_and_export):
    out, model = run_and_export["export"], run_and_export["model"]
    names = set(folder_files(out))
    assert {"model.safetensors", "config.json", "README.md", "training_record.json", "args.yaml", "summary.csv",
            "sep_report/report.json", "sep_report/report.md", "sep_report/sep_curve.png"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_widelast"
    assert config["num_classes"] == 10 and config["num_features"] == 64
    for key, value in TINY_KWARGS.items():
        expected = [value, value] if key == "img_size" else value
        assert config["model_args"][key] == expected, key
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["tag"] == "export" and "origin_url" not in cfg
    record = json.loads((out / "training_record.json").read_text())
    assert record["teacher"] == {"name": "cait_s24_224", "tag": "fb_dist_in1k", "checkpoint": None}
    assert record["weights"] == "raw" and record["selection"] == "final"
    # args.yaml is published: the local folder layout is cut to the last part of each path
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["data_dir"] == "random-tensors" and args["output"] == run_and_export["run"].parent.name
    texts = {rel: data.decode() for rel, data in folder_files(out).items()
             if not rel.endswith((".png", ".safetensors"))}
    assert not [rel for rel, text in texts.items() if str(run_and_export["run"].parent) in text]
    report = json.loads(texts["sep_report/report.json"])
    assert report["data"]["source"] == "images (center, 8 files)"
    assert "images: `images`" in texts["sep_report/report.md"]

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.pretrained_model_args["wide_dim"] == 64 and loaded.num_classes == 10
    assert loaded.blocks[-1].attn.num_heads == 2 and loaded.patch_embed.img_size == (32, 32)
    assert torch.equal(_logits(load_exported(out)), _logits(model))


def test_hf_hub_from_offline_cache(run_and_export, tmp_path, monkeypatch):
    """Lay the export out as a Hub cache (models--org--name/snapshots/<sha>, refs/main) and load it offline."""
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-widelast"
    snapshot = repo / "snapshots" / sha
    blobs = repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for rel, data in folder_files(run_and_export["export"]).items():
        # Real caches store blobs and symlink snapshot files to them.
        import hashlib

        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / rel).symlink_to(os.path.relpath(blob, (snapshot / rel).parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import time; patch the module constants too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    loaded = timm.create_model("hf-hub:test-org/tiny-widelast", pretrained=True)
    assert torch.equal(_logits(loaded), _logits(run_and_export["model"]))
    assert loaded.pretrained_cfg["hf_hub_id"] == "test-org/tiny-widelast"
    assert torch.equal(_logits(load_exported("test-org/tiny-widelast")), _logits(run_and_export["model"]))


def test_unknown_model_without_import(run_and_export, monkeypatch):
    """Without registration timm fails with 'Unknown model'; our helper names the fix."""
    from timm.models import _registry

    # Simulate a process that never imported timm_widelast (restored by monkeypatch).
    monkeypatch.delitem(_registry._model_entrypoints, "deit_tiny_widelast")
    with pytest.raises(RuntimeError, match=r"^Unknown model \(deit_tiny_widelast\)$"):
        timm.create_model(f"local-dir:{run_and_export['export']}", pretrained=True)
    with pytest.raises(RuntimeError, match=r"Unknown model .*install and import timm_widelast"):
        load_exported(run_and_export["export"])


def test_card_metadata_matches_summary(run_and_export):
    out, rows = run_and_export["export"], run_and_export["rows"]
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.license == "apache-2.0"
    assert data.tags == ["image-classification", "timm", "knowledge-distillation", "vision-transformer"]
    assert data.datasets == ["random-tensors"]
    assert data.base_model is None  # trained from scratch in the test run
    results = {r.metric_name: r for r in data.eval_results}
    assert results["top-1 accuracy"].metric_value == pytest.approx(float(rows[-1]["eval_top1"]))
    assert results["top-5 accuracy"].metric_value == pytest.approx(float(rows[-1]["eval_top5"]))
    assert results["top-1 accuracy"].dataset_type == "random-tensors"
    body = card.text
    for needle in ("## Model Details", "Params (M): 0.", "GMACs: 0.", "Activations (M): 0.", "Image size: 32 x 32",
                   "import timm_widelast", "features_only=True", "num_classes=0", "## Training Recipe",
                   "| teacher | `cait_s24_224.fb_dist_in1k` |", "| soft-KD weight a | 0.9 |", "| lr | 0.01 |",
                   "![SEP curve](sep_report/sep_curve.png)", "| d_a (bins) | 32 | 39 |", "2511.15572",
                   "Going Deeper With Image Transformers",  # the teacher is a CaiT
                   f"| {float(rows[-1]['eval_top1']):.2f} | {float(rows[-1]['eval_top5']):.2f} |",
                   "## Model Comparison", "| batch per process | 16 |", "| processes | not recorded |"):
        assert needle in body, needle
    # a 32-wide, 8-pixel-patch student is no DeiT, and its teacher is none either
    assert "Training data-efficient image transformers" not in body and "EMA decay" not in body
    assert "hf-hub:your-org/your-model" in body  # filled in by push


def _card_numbers(folder: Path):
    card = ModelCard.load(folder / "README.md")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results or []}
    return results.get("top-1 accuracy"), results.get("top-5 accuracy")


def test_metrics_belong_to_the_weights_shipped(run_and_export, tmp_path, capsys):
    """Each export's card numbers are re-measured on the exported weights themselves (issue 10 item 2)."""
    run, rows = run_and_export["run"], run_and_export["rows"]
    x, y = eval_data()
    best_epoch = max(range(len(rows)), key=lambda i: float(rows[i]["eval_top1"]))
    assert best_epoch != len(rows) - 1  # the run's best epoch is not its last: numbers differ per weights

    exports = {
        "final": (export(run, tmp_path / "final"), run / "model.safetensors", rows[-1], "eval"),
        "best": (export(run, tmp_path / "best", metric_row="best"), run / "best" / "model.safetensors",
                 rows[best_epoch], "eval"),
        "best_folder": (export(run / "best", tmp_path / "best_folder"), run / "best" / "model.safetensors",
                        rows[best_epoch], "eval"),
        "ema": (export(run, tmp_path / "ema", ema=True), run / "ema" / "model.safetensors", rows[-1], "ema"),
    }
    for name, (out, weights, row, prefix) in exports.items():
        assert folder_files(out)["model.safetensors"] and _same_weights(out / "model.safetensors", weights), name
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
        measured = top1_top5(loaded, x, y)
        recorded = (float(row[f"{prefix}_top1"]), float(row[f"{prefix}_top5"]))
        assert measured == pytest.approx(recorded), name
        assert _card_numbers(out) == pytest.approx(measured), name
        record = json.loads((out / "training_record.json").read_text())
        assert (record["metrics"]["top1"], record["metrics"]["epoch"]) == (recorded[0], str(row["epoch"])), name
        # the run's record comes along from RUN/best too
        assert record["teacher"]["name"] == "cait_s24_224" and (out / "summary.csv").is_file(), name
    assert _card_numbers(exports["best"][0])[0] != _card_numbers(exports["final"][0])[0]
    assert "EMA weights after the last epoch" in (tmp_path / "ema" / "README.md").read_text()
    again = export(tmp_path / "ema", tmp_path / "again")  # an export of an export keeps its numbers and kind
    assert _card_numbers(again) == _card_numbers(tmp_path / "ema")
    assert json.loads((again / "training_record.json").read_text())["weights"] == "ema"

    # a checkpoint the run never evaluated gets no numbers, and the mixes are refused in one line
    (run / "checkpoints").mkdir()
    shutil.copy(run / "best" / "model.safetensors", run / "checkpoints" / "step_5.safetensors")
    out = export(run / "checkpoints" / "step_5.safetensors", tmp_path / "ckpt")
    assert _card_numbers(out) == (None, None) and "no result is claimed" in (out / "README.md").read_text()
    shutil.rmtree(run / "checkpoints")
    for argv, needle in (([str(run), "--ema", "--metric-row", "best"], "best epoch only"),
                         ([str(run / "ema"), "--metric-row", "best"], "holds the ema weights only"),
                         ([str(run / "model.safetensors"), "--metric-row", "best"], "pass the run folder")):
        capsys.readouterr()
        assert run_cli(["export", *argv, "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "refused").exists()


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    sa, sb = load_file(str(a)), load_file(str(b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_overwrite_keeps_the_old_export_on_failure(run_and_export, tmp_path):
    run = run_and_export["run"]
    out = export(run, tmp_path / "ema", ema=True, repo_id="org/tiny-ema")
    assert "hf-hub:org/tiny-ema" in (out / "README.md").read_text()
    # An existing export is replaced only with --overwrite, and kept when the new export fails.
    before = folder_files(out)
    with pytest.raises(Exception, match="already exists"):
        export(run, out)
    with pytest.raises(Exception, match="shape|does not fit|lacks"):
        export(run, out, overwrite=True, model_kwargs={"wide_dim": 96, "wide_heads": 2})
    assert folder_files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema"]  # no temporary folders left behind
    export(run, out, overwrite=True)
    assert json.loads((out / "training_record.json").read_text())["weights"] == "raw"


def test_cli_export_bare_checkpoint_and_errors(run_and_export, tmp_path, capsys):
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    # A DeiT-style training checkpoint dict, as .pth (read with weights_only=True).
    torch.save({"model": run_and_export["model"].state_dict(), "epoch": 2}, ckpt_dir / "checkpoint.pth")
    kwargs = [f"{k}={v}" for k, v in TINY_KWARGS.items() if k != "num_classes"]
    rc = run_cli(["export", str(ckpt_dir / "checkpoint.pth"), "--out", str(tmp_path / "out"),
               "--model", "deit_tiny_widelast", "--model-kwargs", *kwargs])
    assert rc == 0
    out = tmp_path / "out"
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)  # num_classes read off the head
    assert torch.equal(_logits(loaded), _logits(run_and_export["model"]))
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and "no result is claimed" in card.text
    assert not (out / "summary.csv").exists()

    capsys.readouterr()
    rc = run_cli(["export", str(ckpt_dir / "checkpoint.pth"), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: no model name") and err.count("\n") == 1
    rc = run_cli(["export", str(run_and_export["run"]), "--out", str(tmp_path / "out3"),
                  "--model-kwargs", "wide_dim=96"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "fix:" in err and err.count("\n") == 1
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_label_names_and_card_command(run_and_export, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class_{i}" for i in range(10)))
    out = export(run_and_export["run"], tmp_path / "lab", label_names=labels)
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"][3] == "class_3"
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert loaded.pretrained_cfg["label_names"][3] == "class_3"

    # `card` renders the same card from the run folder.
    assert run_cli(["card", str(run_and_export["run"]), "--out", str(tmp_path / "card.md")]) == 0
    card = ModelCard.load(tmp_path / "card.md")
    assert card.data.eval_results[0].metric_value == pytest.approx(float(run_and_export["rows"][-1]["eval_top1"]))


def test_paper_cards_are_current_and_marked():
    """hub_cards/ holds the paper rows, rendered by the current template (regenerate if this fails).

    Only the authors' released weights carry a result in their metadata; the other configurations have no
    weights, so their cards state the paper's number as the paper's (issue 10 item 4).
    """
    from timm.models import get_pretrained_cfg

    from timm_widelast.hub import cards

    folder = REPO_ROOT / "hub_cards"
    released = {"deit_tiny_widelast.cait_s24_softkd_mse_in1k": 78.23,
                "deit_tiny_lift.cait_s24_softkd_spectralkd_in1k": 77.53}
    unreleased = {"deit_tiny_widelast-cait_s24_mse_in1k-not-released": 77.15,
                  "deit_tiny_lift-cait_s24_mse_in1k-not-released": 76.61,
                  "deit_tiny_lift-in1k-not-released": 75.41, "deit_tiny_widelast-in1k-not-released": 75.54}
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted({**released, **unreleased})
    for name, top1 in released.items():
        assert get_pretrained_cfg(name) is not None  # a name timm loads
        card = ModelCard.load(folder / name / "README.md")
        (result,) = card.data.eval_results
        assert result.metric_value == top1 and result.dataset_type == "imagenet-1k"
        assert result.source_url == "https://arxiv.org/abs/2511.15572"
        params = "7.31" if "widelast" in name else "5.98"
        assert "## Model Comparison" in card.text and f"| {top1:.2f} | - | {params} |" in card.text
    for name, top1 in unreleased.items():
        card = ModelCard.load(folder / name / "README.md")
        assert card.data.eval_results is None and "model-index" not in card.content
        assert (f"The paper reports {top1:.2f}% ImageNet-1k top-1 for this configuration (arXiv 2511.15572); "
                "these weights: not measured.") in card.text
        assert "## Model Comparison" not in card.text and "pretrained=False" in card.text
    for name in (*released, *unreleased):
        card = ModelCard.load(folder / name / "README.md")
        assert "the paper's published numbers" in card.text and "import timm_widelast" in card.text
        cites_cait = "Going Deeper With Image Transformers" in card.text
        assert cites_cait == ("cait_s24" in name)  # CaiT only where it was the teacher
    for cfg in cards.PAPER_CONFIGS:
        fresh = str(cards.render_card(cards.paper_card_info(cfg))) + "\n"
        assert (folder / cfg.name / "README.md").read_text() == fresh, "run: timm-widelast cards --paper"
    stats = cards.model_stats(timm.create_model("deit_tiny_widelast", device="meta"))
    assert round(stats.params_m, 2) == 7.31 and round(stats.gmacs, 2) == 1.54
    assert "WideLast + SoftKD + MSE" in (folder / "README.md").read_text()


def test_export_without_optional_files(tmp_path):
    """A run folder with only weights and args.yaml (no summary, no report, no EMA)."""
    info = make_run(tmp_path)
    run = info["run"]
    (run / "summary.csv").unlink()
    for folder in ("ema", "best", "sep_report"):
        shutil.rmtree(run / folder)
    out = export(run, tmp_path / "out")
    assert not (out / "sep_report").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and "No SEP report" in card.text
    with pytest.raises(Exception, match="no EMA weights"):
        export(run, tmp_path / "out-ema", ema=True)


def test_overwrite_replaces_a_file_without_leftovers(run_and_export, tmp_path):
    """--overwrite of a plain file named like the export leaves only the export behind."""
    (tmp_path / "out").write_text("not an export")
    out = export(run_and_export["run"], tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# Exports of real trainer runs (timm_widelast.distill.trainer.train on a tiny image folder)

TRAIN_COMMON = ["-b", "4", "--warmup-epochs", "0", "--workers", "0", "--no-progress", "--lr", "1e-3", "--img-size",
                "32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """runs/teacher (WideLast, no EMA, 1 epoch) and runs/student (Lift, depth 3, distilled from the teacher's
    folder through --kd-checkpoint, with EMA, 1 epoch) on a 3-class folder of generated PNGs."""

    from timm_widelast.distill.trainer import parse_args, train

    root = tmp_path_factory.mktemp("trained")
    make_imagefolder(root / "data")
    common = ["--data-dir", str(root / "data"), "--output", str(root / "runs"), *TRAIN_COMMON]
    train(parse_args(common + ["--model", "deit_tiny_widelast", "--model-kwargs", "patch_size=8", "embed_dim=32",
                               "depth=2", "num_heads=2", "wide_dim=64", "wide_heads=2", "--epochs", "1",
                               "--experiment", "teacher"]))
    train(parse_args(common + ["--model", "deit_tiny_lift", "--model-kwargs", "patch_size=8", "embed_dim=32",
                               "depth=3", "num_heads=2", "lift_dim=64", "--epochs", "1", "--experiment", "student",
                               "--kd-checkpoint", str(root / "runs" / "teacher"), "--distill-loss-weight", "0.9",
                               "--model-ema", "--model-ema-decay", "0.5"]))
    return root / "runs"


def test_trainer_run_config_names_the_run(trained):
    """config.json of a run names the run, not the architecture's default (released) tag (issue 10 item 5)."""
    for folder, tag in (("student", "student"), ("student/best", "student_best"), ("student/ema", "student_ema"),
                        ("teacher", "teacher")):
        text = (trained / folder / "config.json").read_text()
        config = json.loads(text)
        assert config["pretrained_cfg"]["tag"] == tag, folder
        assert "Huiyuancs" not in text and "hf_hub_id" not in text and "softkd" not in text, folder
    loaded = timm.create_model(f"local-dir:{trained / 'student'}", pretrained=True)
    assert loaded.pretrained_cfg["tag"] == "student"


def test_export_ema_and_card_details_of_a_trainer_run(trained, tmp_path, capsys):
    """`export RUN --ema` reads the trainer's ema/ (item 11); teacher, batch, EMA and citations are true (item 3)."""
    import csv

    from safetensors.torch import load_file

    run = trained / "student"
    out = tmp_path / "student-ema"
    assert run_cli(["export", str(run), "--ema", "--out", str(out)]) == 0, capsys.readouterr().err
    exported, ema = load_file(str(out / "model.safetensors")), load_file(str(run / "ema" / "model.safetensors"))
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    last = list(csv.DictReader(open(run / "summary.csv")))[-1]
    assert _card_numbers(out) == pytest.approx((float(last["ema_top1"]), float(last["ema_top5"])))
    record = json.loads((out / "training_record.json").read_text())
    assert record["teacher"] == {"name": "deit_tiny_widelast", "tag": None, "checkpoint": "teacher"}
    assert (record["weights"], record["selection"]) == ("ema", "ema")
    card = (out / "README.md").read_text()
    for needle in ("| teacher | `deit_tiny_widelast (weights: teacher)` |",
                   "| global batch | 4 (4 per process x 1 process) |",  # -b 4, one process, no accumulation
                   "| EMA decay | 0.5 |", "| soft-KD weight a | 0.9 |", "EMA weights after the last epoch"):
        assert needle in card, needle
    assert "feature weight" not in card  # no feature loss in this run
    assert "Going Deeper With Image Transformers" not in card and "Training data-efficient" not in card
    assert str(trained.parent) not in "".join(p.read_text() for p in out.rglob("*.*") if p.suffix != ".safetensors")

    teacher = export(trained / "teacher", tmp_path / "teacher")
    card = (teacher / "README.md").read_text()
    assert "EMA decay" not in card and "| teacher | none |" in card  # EMA was off; no teacher
    assert json.loads((teacher / "training_record.json").read_text())["teacher"] is None


def test_teacher_from_a_checkpoint_file_and_global_batch():
    """A --kd-checkpoint weights file names the teacher by --kd-model-name and the file (no borrowed tag)."""
    from timm_widelast.hub.export import recipe_rows, teacher_label, teacher_of

    args = {"kd_model_name": "cait_s24_224.fb_dist_in1k", "kd_checkpoint": "/data/me/teachers/cait.safetensors",
            "distill_loss_weight": 0.0, "feat_loss": "mse", "feat_weight": 0.2}
    teacher = teacher_of(args, {})
    assert teacher == {"name": "cait_s24_224", "tag": None, "checkpoint": "teachers/cait.safetensors"}
    assert teacher_label(teacher) == "cait_s24_224 (weights: teachers/cait.safetensors)"
    assert teacher_of({**args, "feat_loss": "none"}, {}) is None  # no loss uses a teacher: none was built
    rows = dict(recipe_rows({"batch_size": 64, "grad_accum_steps": 2}, None, num_processes=4))
    assert rows["global batch"] == "512 (64 per process x 4 processes x 2 accumulation steps)"  # 64 * 4 * 2


def _usage_snippets(readme: str):
    """The python blocks of a card's "Model Usage" section, in order."""
    section = readme.split("## Model Usage", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def _run_snippets(readme: str, ref: str, new_ref: str, monkeypatch, capsys) -> dict:
    import io
    import urllib.request

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray((np_rng().random((48, 64, 3)) * 255).astype("uint8")).save(png, format="PNG")
    # the snippets download a sample image: serve a generated one instead (no network in tests)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: io.BytesIO(png.getvalue()))
    snippets = _usage_snippets(readme)
    assert len(snippets) == 3 and all(f"'{ref}'" in s for s in snippets)
    namespace: dict = {}
    outputs = []
    for code in snippets:
        capsys.readouterr()
        exec(compile(code.replace(f"'{ref}'", f"'{new_ref}'"), "<card snippet>", "exec"), namespace)
        outputs.append((dict(namespace), capsys.readouterr().out))
    return {"namespace": namespace, "outputs": outputs, "png": png.getvalue()}


def np_rng():
    import numpy as np

    return np.random.default_rng(3)


def test_card_usage_snippets_run(trained, tmp_path, monkeypatch, capsys):
    """Every code block of a card's "Model Usage" runs for real, with the card's model as ``local-dir:`` (item 1)."""
    import io
    import re

    from PIL import Image

    out = export(trained / "student", tmp_path / "student")
    readme = (out / "README.md").read_text()
    ran = _run_snippets(readme, "hf-hub:your-org/your-model", f"local-dir:{out}", monkeypatch, capsys)
    (classify, _), (features, printed), (embed, _) = ran["outputs"]

    # independently: the exported model with its head, on the same image and timm's eval transforms
    reference = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    cfg = timm.data.resolve_model_data_config(reference)
    x = timm.data.create_transform(**cfg, is_training=False)(Image.open(io.BytesIO(ran["png"])).convert("RGB"))[None]
    with torch.no_grad():
        logits = reference(x)
        pooled = reference.forward_head(reference.forward_features(x), pre_logits=True)
    assert torch.allclose(classify["output"], logits, atol=1e-5)
    assert classify["top3_class_indices"].tolist() == [logits.argsort(descending=True)[0, :3].tolist()]  # 3 classes
    assert embed["output"].shape == (1, 64) and torch.allclose(embed["output"], pooled, atol=1e-5)
    # the printed feature maps end with the shape the card's comment shows
    example = re.search(r"e\.g\. (torch\.Size\(\[[^\]]*\]\))", readme).group(1)
    assert printed.strip().splitlines()[-1] == example


def test_unreleased_paper_card_snippets_run(monkeypatch, capsys):
    """A paper card without weights builds the architecture with random weights; its snippets run as written."""
    from timm_widelast.hub import cards

    cfg = next(c for c in cards.PAPER_CONFIGS if not c.released)
    readme = (REPO_ROOT / "hub_cards" / cfg.name / "README.md").read_text()
    ran = _run_snippets(readme, cfg.architecture, cfg.architecture, monkeypatch, capsys)
    (classify, _), (_, printed), (embed, _) = ran["outputs"]
    assert classify["output"].shape == (1, 1000) and embed["output"].shape == (1, 384)
    assert printed.strip().splitlines()[-1] == "torch.Size([1, 384, 14, 14])"


def _one_line_error(argv, capsys, needle: str) -> None:
    capsys.readouterr()
    rc = run_cli(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("code, needle", [(28, "no space left"), (30, "read-only file system")])
def test_export_onto_a_full_or_read_only_filesystem(run_and_export, tmp_path, monkeypatch, capsys, code, needle):
    """ENOSPC / EROFS while writing: one line, exit 2, the earlier export intact, no leftovers (item 12).

    Tests run as root here, where a chmod does not stop writes: the failing write is injected at the
    file-writing layer, for the weights (the first and largest file).
    """
    import errno
    import pathlib

    out = export(run_and_export["run"], tmp_path / "out")
    before = folder_files(out)
    real_write = pathlib.Path.write_bytes

    def failing_write(self, data):
        if self.name == "model.safetensors" and self.parent.name.startswith(".out.tmp-"):
            raise OSError(code, os.strerror(code), str(self))
        return real_write(self, data)

    assert code == {"no space left": errno.ENOSPC, "read-only file system": errno.EROFS}[needle]
    monkeypatch.setattr(pathlib.Path, "write_bytes", failing_write)
    _one_line_error(["export", str(run_and_export["run"]), "--out", str(out), "--overwrite"], capsys, needle)
    assert folder_files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_into_a_read_only_folder(run_and_export, tmp_path, capsys):
    """A real read-only parent: a read-only tmpfs mount as root (when mounting works), else chmod."""
    import subprocess

    parent = tmp_path / "ro"
    parent.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(parent)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("root without mount permission: chmod cannot make a folder read-only for root")
    else:
        parent.chmod(0o555)
    try:
        _one_line_error(["export", str(run_and_export["run"]), "--out", str(parent / "out")], capsys,
                        "read-only file system" if mounted else "permission denied")
        assert not (parent / "out").exists() and list(parent.iterdir()) == []
        (tmp_path / "file").write_text("x")  # and a parent that is a file
        _one_line_error(["export", str(run_and_export["run"]), "--out", str(tmp_path / "file" / "out")], capsys,
                        "is a file")
    finally:
        if mounted:
            subprocess.run(["umount", str(parent)], check=True)
        else:
            parent.chmod(0o755)


def test_export_onto_a_really_full_filesystem(run_and_export, tmp_path, capsys):
    """A 64 KiB tmpfs (root with mount permission only): the weights do not fit."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root with mount permission for a small tmpfs")
    try:
        _one_line_error(["export", str(run_and_export["run"]), "--out", str(disk / "out")], capsys, "no space left")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_labels_use_short_model_names(tmp_path):
    """Cards name models by a short name, never by a ``local-dir:`` path (issue 10 item 16)."""
    from timm_widelast.hub import cards
    from timm_widelast.hub.export import teacher_label, teacher_of

    section = cards.sep_section({"model": {"name": "local-dir:/home/me/runs/exp-1/", "tap": "blocks.1"}}, "r", None)
    assert section["label"] == "exp-1"
    assert cards.sep_section({"model": {"label": "hf-hub:org/tiny"}}, "r", None)["label"] == "org/tiny"
    teacher = teacher_of({"kd_model_name": "local-dir:/home/me/runs/teacher_run"}, {})
    assert teacher_label(teacher) == "teacher_run"
    name = "deit_tiny_widelast.cait_s24_softkd_mse_in1k"
    assert cards.short_name(name) == name
