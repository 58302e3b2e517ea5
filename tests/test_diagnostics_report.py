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
    # --device cpu: the direct NumPy references run on the CPU, and so must the tool (a GPU machine would
    # otherwise pick cuda:0); 5 permutations keep the robustness check cheap
    return ["sep", TINY_NAME, *TINY_ARGS, "--images", images, "--out", out, "--batch-size", 5,
            "--workers", 0, "--no-progress", "--device", "cpu", "--permutations", 5, *extra]


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "timm_widelast.cli", *[str(a) for a in sep_argv(root, out, "--no-plots")]]
    # two CPU processes (gloo), whatever GPUs the machine has: on a 1-GPU machine two ranks cannot
    # each get a GPU. `--device cpu` in sep_argv says so to accelerate; hiding the GPUs makes sure.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = load_report(cli_report), load_report(out)
    assert two["settings"]["processes"] == 2 and two["settings"]["device"] == "cpu"
    assert one["images"] == two["images"]
    assert one["data"]["num_skipped"] == two["data"]["num_skipped"] == 1
    for a, b in ((one["svd"]["ranks"], two["svd"]["ranks"]), (one["pca"]["required_dims"], two["pca"]["required_dims"]),
                 (one["sep"]["per_image_d"], two["sep"]["per_image_d"]), (one["sep"]["d"], two["sep"]["d"])):
        assert a == b
    np.testing.assert_allclose(one["pca"]["energy_mean"], two["pca"]["energy_mean"], atol=1e-12)
    np.testing.assert_allclose(one["sep"]["mean_curve"], two["sep"]["mean_curve"], atol=1e-10)
    p1, p2 = one["sep"]["permutations"]["per_image"], two["sep"]["permutations"]["per_image"]
    np.testing.assert_allclose(p1["b_mean"], p2["b_mean"], atol=1e-12)
    np.testing.assert_allclose(p1["curve_l1"], p2["curve_l1"], atol=1e-10)


def test_report_json_round_trips_to_plots(cli_report, tmp_path):
    report = json.loads((cli_report / "report.json").read_text())
    paths = plot_report(report, tmp_path)
    assert [p.name for p in paths] == ["sep_curve.png", "rank_hist.png", "pca_energy.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_library_batch_split_pass2_and_dtype(tmp_path):
    model = tiny_model()
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    base = run_report(model, images, None, batch_size=7, permutations=1, progress=False, device="cpu")
    # the caller's model comes back without any hook of ours
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for bs, pass2 in ((2, "rerun"), (3, "cache")):
        r = run_report(model, images, None, batch_size=bs, pass2=pass2, permutations=1, progress=False,
                       device="cpu")
        assert r["settings"]["pass2"] == pass2
        assert r["svd"]["ranks"] == base["svd"]["ranks"] and r["pca"]["required_dims"] == base["pca"]["required_dims"]
        assert r["sep"]["d"] == base["sep"]["d"] and r["sep"]["permutations"]["b"] == base["sep"]["permutations"]["b"]
        np.testing.assert_allclose(r["sep"]["mean_curve"], base["sep"]["mean_curve"], atol=1e-10)
    half = run_report(model, images, None, dtype="bfloat16", progress=False, permutations=0, device="cpu")
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


def test_report_md_rounds_like_the_release_and_shows_the_robustness_check(cli_report):
    report = load_report(cli_report)
    md = (cli_report / "report.md").read_text()
    svd, pca = np.array(report["svd"]["ranks"]), np.array(report["pca"]["required_dims"])
    p99 = np.concatenate([np.percentile(svd, 99, axis=0), np.percentile(pca, 99, axis=0)])
    assert not np.allclose(p99, np.round(p99))  # some percentile falls between images: rounding matters
    assert report["svd"]["percentiles"]["99"] == pytest.approx(p99[:4].tolist())  # JSON keeps the floats
    row = "| " + " | ".join([TINY_NAME, "48", *[str(int(round(v))) for v in p99]]) + " |"
    assert row in md
    b = np.array(report["sep"]["per_image_b"])
    means = ", ".join(f"{a:g}%: {v:.3f}" for a, v in zip(report["sep"]["levels"], b.mean(0)))
    assert f"mean over images: {means}" in md
    assert "median" not in md
    assert "numpy.random.default_rng(2026)" in md and "release statistic" in md and "Curve-L1" in md


def test_sweep_equals_single_layer_runs(folder, cli_report, tmp_path, capsys):
    root, _ = folder
    code, out, err = run_cli(sep_argv(root, tmp_path / "sweep", "--layers", "all"), capsys)
    assert code == 0, err
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "| blocks.0 | 48 |" in md and "| blocks.1 | 48 |" in md
    assert (tmp_path / "sweep" / "depth.png").read_bytes()[:4] == b"\x89PNG"
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [row["layer"] for row in sweep["layers"]] == ["blocks.0", "blocks.1"]
    # the last block equals the default single-layer CLI run; block 0 a single-layer library run
    single0 = run_report(tiny_model(seed=0), root, None, layer=0, batch_size=5, permutations=5,
                         progress=False, device="cpu")
    for name, single in (("blocks.1", load_report(cli_report)), ("blocks.0", single0)):
        layer = load_report(tmp_path / "sweep" / "layers" / name)
        assert layer["model"]["tap"] == single["model"]["tap"] == name
        assert layer["svd"]["ranks"] == single["svd"]["ranks"]
        assert layer["pca"]["required_dims"] == single["pca"]["required_dims"]
        assert layer["sep"]["d"] == single["sep"]["d"] and layer["sep"]["per_image_d"] == single["sep"]["per_image_d"]
        np.testing.assert_allclose(layer["pca"]["eigenvalues"], single["pca"]["eigenvalues"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(layer["sep"]["permutations"]["per_image"]["b_mean"],
                                   single["sep"]["permutations"]["per_image"]["b_mean"], atol=1e-12)
    assert single0["svd"]["ranks"] != load_report(cli_report)["svd"]["ranks"]  # the layers do differ


def tiny_widelast_run(folder: Path, with_config: bool):
    """A trainer-style run folder: model.safetensors (+ timm's config.json) of a small WideLast."""
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    import timm_widelast  # noqa: F401

    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_widelast", img_size=32, patch_size=8, embed_dim=32, depth=2,
                              num_heads=2, wide_dim=64, wide_heads=2, num_classes=5)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    if with_config:  # as the trainer writes it, with the run's own preprocessing
        save_config_for_hf(model, folder / "config.json", data_config=dict(
            input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0,
            interpolation="bilinear"))
    return model


def test_sep_checkpoint_reads_the_config_beside_it(folder, tmp_path, capsys):
    root, _ = folder
    model = tiny_widelast_run(tmp_path / "run", with_config=True)
    loaded = build_model("deit_tiny_widelast", str(tmp_path / "run" / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    argv = ["sep", "deit_tiny_widelast", "--checkpoint", tmp_path / "run" / "model.safetensors", "--images", root,
            "--out", tmp_path / "o", "--num-images", 4, "--permutations", 0, "--no-plots", "--no-progress",
            "--workers", 0, "--device", "cpu"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    report = load_report(tmp_path / "o")
    assert report["model"]["dim"] == 64  # the wide last block, as the config says
    assert report["model"]["data_config"]["mean"] == [0.5, 0.5, 0.5]  # the run's preprocessing, not ImageNet's
    tiny_widelast_run(tmp_path / "bare", with_config=False)
    argv[3] = tmp_path / "bare" / "model.safetensors"
    code, _, err = run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--model-kwargs" in lines[0], err


def test_offline_pretrained_is_one_line_naming_the_local_file_option(folder, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    from safetensors.torch import save_file

    root, _ = folder
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1: no network, fail at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    base = ["sep", TINY_NAME, "--model-kwargs", *[f"{k}={v}" for k, v in TINY.items()], "--images", root,
            "--num-images", 3, "--permutations", 0, "--no-plots", "--no-progress", "--workers", 0, "--device", "cpu"]
    code, _, err = run_cli([*base, "--out", tmp_path / "o"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "--pretrained-file" in lines[0] and "--checkpoint" in lines[0], err
    weights = tiny_model(seed=7).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "w.safetensors")
    loaded = build_model(TINY_NAME, model_kwargs=dict(TINY), pretrained_file=str(tmp_path / "w.safetensors"))
    for k, v in weights.items():
        assert torch.equal(loaded.state_dict()[k], v)
    code, _, err = run_cli([*base, "--pretrained-file", tmp_path / "w.safetensors", "--out", tmp_path / "o"], capsys)
    assert code == 0, err


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_plots_fit_the_data_and_keep_legends_off_the_curves(cli_report):
    from timm_widelast.diagnostics.plots import rank_hist_figure, sep_curves_figure

    report = load_report(cli_report)
    report["model"]["label"] = "local-dir:/some/where/runs/my_student"
    fig = rank_hist_figure(report)
    fig.canvas.draw()
    svd, pca = np.array(report["svd"]["ranks"]), np.array(report["pca"]["required_dims"])
    for j, ax in enumerate(fig.axes):
        lo, hi = min(svd[:, j].min(), pca[:, j].min()), max(svd[:, j].max(), pca[:, j].max())
        x0, x1 = ax.get_xlim()
        assert x0 < lo and hi < x1 and (x1 - x0) <= (hi - lo) + 2 * max(1, 0.05 * (hi - lo)) + 1e-9
        assert all(p.get_alpha() is not None and p.get_alpha() < 1 for p in ax.patches if p.get_fill())
    assert fig._suptitle.get_text().startswith("my_student")
    legends = [lg for ax in fig.axes if (lg := ax.get_legend())]
    assert legends and not any(_boxes_overlap(lg.get_window_extent(), ax.get_window_extent())
                               for lg in legends for ax in fig.axes)
    fig = sep_curves_figure([report])
    fig.canvas.draw()
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()][0] == "my_student (D=48)"
    assert not _boxes_overlap(legend.get_window_extent(), fig.axes[0].get_window_extent())


def test_compare_table_is_integer_and_advise_rejects_a_word(cli_report, tmp_path, capsys):
    code, _, _ = run_cli(["compare", cli_report, "--out", tmp_path], capsys)
    md = (tmp_path / "compare.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith(f"| {TINY_NAME} | 48 |"))
    assert all(cell.strip().isdigit() for cell in row.strip("|").split("|")[1:])
    assert any(v != int(v) for v in json.loads((tmp_path / "compare.json").read_text())["rows"][0]["pca"]
               + json.loads((tmp_path / "compare.json").read_text())["rows"][0]["svd"])  # JSON keeps floats
    code, out, err = run_cli(["advise", cli_report, "--student-width", "wide"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "usage" not in err, err
    code, out, err = run_cli(["advise", cli_report, "--student-width", 96, "--json"], capsys)
    assert code == 0 and json.loads(out)["warnings"] and err.startswith("warning:")
