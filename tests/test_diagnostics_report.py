"""The report pipeline end to end: CLI, files, plots, processes, and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _diag_helpers import TINY, TINY_ARGS, TINY_NAME, direct_pca, direct_sep, numpy_rank, tiny_model, write_images

from timm_widelast.cli import main
from timm_widelast.diagnostics import build_model, load_report, paper1000_images, plot_report, run_report
from timm_widelast.taps import extract_tokens

THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
FILES = ["report.json", "report.md", "sep_curve.png", "rank_hist.png", "pca_energy.png"]


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def sep_argv(images, out, *extra):
    return ["sep", TINY_NAME, *TINY_ARGS, "--images", images, "--out", out, "--batch-size", 5,
            "--workers", 0, "--no-progress", *extra]


def direct_stats(files):
    """Tokens by the package's tap on a freshly built model, statistics by plain NumPy."""
    import timm
    from PIL import Image

    model = tiny_model(seed=0)  # the CLI seeds a randomly initialised model with --seed (default 0)
    cfg = timm.data.resolve_data_config({}, model=model)
    cfg.update(input_size=(3, 32, 32), crop_pct=1.0)
    transform = timm.data.create_transform(**cfg)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        tokens = extract_tokens(model, x).double().numpy()
    svd = np.array([[numpy_rank(t, th) for th in THRESHOLDS] for t in tokens])
    curves, dims = direct_pca(tokens, False, THRESHOLDS)
    return svd, curves, dims, direct_sep(tokens)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    files = write_images(root, classes=3, per_class=4)
    (root / "class1" / "broken.png").write_bytes(b"not an image")
    return root, files


@pytest.fixture(scope="module")
def cli_report(folder, tmp_path_factory):
    root, _ = folder
    out = tmp_path_factory.mktemp("report")
    assert main([str(a) for a in sep_argv(root, out)]) == 0
    return out


def test_cli_report_matches_direct_numpy(folder, cli_report):
    _, files = folder
    for name in FILES:
        assert (cli_report / name).stat().st_size > 0
    assert not [p for p in os.listdir(cli_report) if p.endswith(".tmp")]
    report = load_report(cli_report)
    assert report["schema"] == "timm-widelast/sep-report/v1"
    assert report["data"]["num_images"] == 12 and report["data"]["num_skipped"] == 1
    assert "broken.png" in report["data"]["skipped"][0]
    assert report["images"] == [str(f.relative_to(folder[0])) for f in files]
    svd, curves, dims, sep_curve = direct_stats(files)
    np.testing.assert_array_equal(report["svd"]["ranks"], svd)
    np.testing.assert_array_equal(report["pca"]["required_dims"], dims)
    np.testing.assert_allclose(report["pca"]["energy_mean"], curves.mean(0), atol=1e-6)
    np.testing.assert_allclose(report["sep"]["mean_curve"], sep_curve, atol=1e-6)
    np.testing.assert_allclose(report["svd"]["percentiles"]["99"], np.percentile(svd, 99, axis=0))
    md = (cli_report / "report.md").read_text()
    assert "| model | D | SVD 80 | SVD 90 | SVD 95 | SVD 99 | PCA 80 | PCA 90 | PCA 95 | PCA 99 |" in md
    assert "| d |" in md and "| b |" in md


def test_two_processes_give_the_same_numbers(folder, cli_report, tmp_path):
    root, _ = folder
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           "-m", "timm_widelast.cli", *[str(a) for a in sep_argv(root, out, "--no-plots")]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = load_report(cli_report), load_report(out)
    assert two["settings"]["processes"] == 2
    assert one["images"] == two["images"]
    assert one["data"]["num_skipped"] == two["data"]["num_skipped"] == 1
    for a, b in ((one["svd"]["ranks"], two["svd"]["ranks"]), (one["pca"]["required_dims"], two["pca"]["required_dims"]),
                 (one["sep"]["per_image_d"], two["sep"]["per_image_d"]), (one["sep"]["d"], two["sep"]["d"])):
        assert a == b
    np.testing.assert_allclose(one["pca"]["energy_mean"], two["pca"]["energy_mean"], atol=1e-12)
    np.testing.assert_allclose(one["sep"]["mean_curve"], two["sep"]["mean_curve"], atol=1e-10)


def test_report_json_round_trips_to_plots(cli_report, tmp_path):
    report = json.loads((cli_report / "report.json").read_text())
    paths = plot_report(report, tmp_path)
    assert [p.name for p in paths] == ["sep_curve.png", "rank_hist.png", "pca_energy.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_library_batch_split_pass2_and_dtype(tmp_path):
    model = tiny_model()
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    base = run_report(model, images, None, batch_size=7, permutations=1, progress=False)
    for bs, pass2 in ((2, "rerun"), (3, "cache")):
        r = run_report(model, images, None, batch_size=bs, pass2=pass2, permutations=1, progress=False)
        assert r["settings"]["pass2"] == pass2
        assert r["svd"]["ranks"] == base["svd"]["ranks"] and r["pca"]["required_dims"] == base["pca"]["required_dims"]
        assert r["sep"]["d"] == base["sep"]["d"] and r["sep"]["permutations"]["b"] == base["sep"]["permutations"]["b"]
        np.testing.assert_allclose(r["sep"]["mean_curve"], base["sep"]["mean_curve"], atol=1e-10)
    half = run_report(model, images, None, dtype="bfloat16", progress=False, permutations=0)
    assert half["model"]["dtype"] == "bfloat16" and len(half["svd"]["ranks"]) == 7
    assert np.abs(np.array(half["svd"]["ranks"]) - np.array(base["svd"]["ranks"])).max() <= 3


def test_checkpoint_files_load(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(seed=5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"model": state, "epoch": 3}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = build_model(TINY_NAME, str(tmp_path / name), model_kwargs=dict(TINY))
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k])


def test_paper1000_protocol_takes_first_file_of_each_class(tmp_path):
    files = write_images(tmp_path, classes=3, per_class=3)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "class0" / "notes.txt").write_text("x")
    picks = paper1000_images(tmp_path)
    assert picks == [tmp_path / f"class{c}" / "img0.png" for c in range(3)]
    assert set(picks) <= set(files)


def test_compare_and_advise(cli_report, tmp_path, capsys):
    code, out, _ = run_cli(["compare", cli_report, cli_report, "--out", tmp_path], capsys)
    assert code == 0 and "SVD 80" in out
    for name in ("compare.md", "compare.json", "sep_compare.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = load_report(cli_report)
    need = float(np.percentile(np.array(report["pca"]["required_dims"])[:, 2], 99))
    code, out, _ = run_cli(["advise", cli_report, "--student-width", 4, "--json"], capsys)
    advice = json.loads(out)
    assert code == 0 and advice["pca_d"] == pytest.approx(need)
    assert not advice["fits"] and advice["recommendation"] == "widelast" and advice["recommended_width"] == 48
    code, out, _ = run_cli(["advise", cli_report, "--student-width", 48], capsys)
    assert code == 0 and "plain feature KD" in out


@pytest.mark.parametrize("case", ["empty", "threshold", "layer_range", "layer_not_tokens", "bad_stop",
                                  "advise_energy", "no_report", "two_sources", "compare_percentile"])
def test_bad_input_is_one_line_with_exit_2(case, folder, cli_report, tmp_path, capsys):
    root, _ = folder
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = {
        "empty": sep_argv(empty, tmp_path / "o"),
        "threshold": sep_argv(root, tmp_path / "o", "--thresholds", "0.9", "1.5"),
        "layer_range": sep_argv(root, tmp_path / "o", "--layer", "7"),
        "layer_not_tokens": sep_argv(root, tmp_path / "o", "--layer", "head"),
        "bad_stop": sep_argv(root, tmp_path / "o", "--on-bad-image", "stop"),
        "advise_energy": ["advise", cli_report, "--student-width", 8, "--energy", 0.85],
        "no_report": ["advise", empty, "--student-width", 8],
        "two_sources": sep_argv(root, tmp_path / "o", "--dataset", "torch/cifar10"),
        "compare_percentile": ["compare", cli_report, "--out", tmp_path / "o", "--percentile", 150],
    }[case]
    code, _, err = run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    if case != "layer_range":  # that message comes from timm_widelast.taps, worded "(use 0..1 ...)"
        assert "fix:" in lines[0], err
    assert not Path(tmp_path / "o" / "report.json").exists()
