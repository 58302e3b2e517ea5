"""Exports (local-dir / hf-hub round trips), the loader helper, and model cards."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from _hub_helpers import TINY_KWARGS, folder_files, make_run, make_run_and_export, run_cli
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
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["tag"] == "export"
    record = json.loads((out / "training_record.json").read_text())
    assert record["teacher"] == {"name": "cait_s24_224", "tag": "fb_dist_in1k"} and record["weights"] == "raw"

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
                   "| teacher | `cait_s24_224.fb_dist_in1k` |", "| soft-KD weight a | 0.9 |", "| lr | 0.05 |",
                   "![SEP curve](sep_report/sep_curve.png)", "| d_a (bins) | 32 | 39 |", "2511.15572",
                   "Going Deeper With Image Transformers", "Training data-efficient image transformers",
                   f"| {float(rows[-1]['eval_top1']):.2f} | {float(rows[-1]['eval_top5']):.2f} |"):
        assert needle in body, needle
    assert "hf-hub:your-org/your-model" in body  # filled in by push


def test_export_ema_best_row_and_overwrite(run_and_export, tmp_path):
    run = run_and_export["run"]
    out = export(run, tmp_path / "ema", ema=True, metric_row="best", repo_id="org/tiny-ema")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    expected = timm.create_model("deit_tiny_widelast", **TINY_KWARGS)
    expected.load_state_dict(run_and_export["ema"])
    assert torch.equal(_logits(loaded), _logits(expected))
    card = ModelCard.load(out / "README.md")
    best = max(float(r["eval_top1"]) for r in run_and_export["rows"])
    assert card.data.eval_results[0].metric_value == pytest.approx(best)
    assert "hf-hub:org/tiny-ema" in card.text and "EMA weights" in card.text

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
    """hub_cards/ holds the paper rows, rendered by the current template (regenerate if this fails)."""
    from timm_widelast.hub import cards

    folder = REPO_ROOT / "hub_cards"
    expected = {"deit_tiny_widelast.cait_s24_softkd_mse_in1k": 78.23, "deit_tiny_widelast.cait_s24_mse_in1k": 77.15,
                "deit_tiny_lift.cait_s24_softkd_spectralkd_in1k": 77.53, "deit_tiny_lift.cait_s24_mse_in1k": 76.61,
                "deit_tiny_lift.in1k": 75.41, "deit_tiny_widelast.in1k": 75.54}
    for name, top1 in expected.items():
        card = ModelCard.load(folder / name / "README.md")
        (result,) = card.data.eval_results
        assert result.metric_value == top1 and result.dataset_type == "imagenet-1k"
        assert result.source_url == "https://arxiv.org/abs/2511.15572"
        assert "the paper's published numbers" in card.text and "import timm_widelast" in card.text
    cfg = cards.PAPER_CONFIGS[0]
    fresh = str(cards.render_card(cards.paper_card_info(cfg))) + "\n"
    assert (folder / cfg.name / "README.md").read_text() == fresh, "run: timm-widelast cards --paper --out hub_cards"
    stats = cards.model_stats(timm.create_model("deit_tiny_widelast", device="meta"))
    assert round(stats.params_m, 2) == 7.31 and round(stats.gmacs, 2) == 1.54
    assert "WideLast + SoftKD + MSE" in (folder / "README.md").read_text()


def test_export_without_optional_files(tmp_path):
    """A run folder with only weights and args.yaml (no summary, no report, no EMA)."""
    info = make_run(tmp_path)
    run = info["run"]
    (run / "summary.csv").unlink()
    (run / "model_ema.safetensors").unlink()
    shutil.rmtree(run / "sep_report")
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
