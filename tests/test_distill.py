"""Loss terms vs hand computations, endpoint taps vs plain forwards, and the frozen teacher."""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from _tiny_models import TINY, cait_teacher, deit_teacher, lift, swin_teacher, widelast
from torch.utils._python_dispatch import TorchDispatchMode

import timm_widelast  # noqa: F401
from timm_widelast.distill import (
    EndpointDistillationTask,
    FrozenTeacher,
    channel_avg_pool,
    resize_grid,
    soft_kd_loss,
    spectral_feature_loss,
)
from timm_widelast.errors import UserError


# --- losses ------------------------------------------------------------------------------------------
def test_soft_kd_is_kl_batchmean_times_tau_squared():
    torch.manual_seed(0)
    s, t, tau = torch.randn(5, 7), torch.randn(5, 7), 2.0
    p_t = torch.softmax(t / tau, -1)
    hand = (p_t * (p_t.log() - torch.log_softmax(s / tau, -1))).sum() / 5 * tau ** 2
    assert torch.allclose(soft_kd_loss(s, t, tau), hand, atol=1e-6)


def _dft(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * k[:, None] * k[None, :] / n) / math.sqrt(n)


def test_spectral_loss_matches_explicit_dft_over_space():
    torch.manual_seed(0)
    b, h, w, c = 2, 4, 6, 3
    s, t = torch.randn(b, h * w, c), torch.randn(b, h * w, c)
    def spectrum(tokens):
        grid = tokens.double().reshape(b, h, w, c).permute(0, 3, 1, 2).to(torch.complex128)
        full = _dft(h) @ grid @ _dft(w).T  # 2-D DFT over the spatial grid, ortho scaling
        half = full[..., : w // 2 + 1]  # what rfft2 keeps
        return torch.stack([half.real, half.imag], -1)
    hand = ((spectrum(s) - spectrum(t)) ** 2).mean()
    assert torch.allclose(spectral_feature_loss(s, t, (h, w)).double(), hand, atol=1e-6)


def test_naive_channel_pool_mse():
    torch.manual_seed(0)
    t = torch.randn(2, 16, 8)
    s = torch.randn(2, 16, 4)
    pooled = channel_avg_pool(t, 4)
    hand = torch.stack([t[..., 2 * i: 2 * i + 2].mean(-1) for i in range(4)], -1)
    assert torch.allclose(pooled, hand, atol=1e-6)
    assert torch.allclose(F.mse_loss(s, pooled), ((s - hand) ** 2).mean())


def test_resize_grid_bilinear():
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    out = resize_grid(tokens, (4, 4), (2, 2))
    ref = F.interpolate(tokens.reshape(1, 4, 4, 1).permute(0, 3, 1, 2), size=(2, 2), mode="bilinear")
    assert torch.allclose(out, ref.flatten(2).transpose(1, 2))


def test_task_total_loss_is_weighted_sum():
    torch.manual_seed(0)
    student, teacher = widelast().eval(), deit_teacher().eval()
    task = EndpointDistillationTask(student, FrozenTeacher(teacher), criterion_kwargs=dict(smoothing=0.1),
                                    distill_loss_weight=0.9, temperature=1.0, feat_loss="mse", feat_weight=0.2)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    task.eval()
    out = task(x, y)
    x_t = task.teacher.preprocess(x)  # the teacher sees its own normalization (checked in its own test)
    logits_s, logits_t = student(x), teacher(x_t)
    # CE with label smoothing 0.1, by hand
    logp = torch.log_softmax(logits_s, -1)
    ce = (-(0.9 * logp.gather(1, y[:, None]).squeeze(1)) - 0.1 * logp.mean(-1)).mean()
    p_t = torch.softmax(logits_t, -1)
    kl = (p_t * (p_t.log() - logp)).sum() / 3
    s_tok = student.forward_features(x)  # pre-norm endpoint is what the tap reads: recompute by hand
    blocks_out = _manual_vit_tokens(student, x)
    t_tok = _manual_vit_tokens(teacher, x_t)
    mse = ((blocks_out - t_tok) ** 2).mean()
    assert s_tok.shape[-1] == 64
    assert torch.allclose(out["task_loss"], ce, atol=1e-5)
    assert torch.allclose(out["kd_loss"], kl, atol=1e-5)
    assert torch.allclose(out["feat_loss"], mse, atol=1e-5)
    assert torch.allclose(out["loss"], 0.1 * ce + 0.9 * kl + 0.2 * mse, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(distill_loss_weight=-0.1), dict(distill_loss_weight=1.5),
                                dict(feat_loss="mse", feat_weight=-1.0), dict(task_loss_weight=-1.0)])
def test_impossible_weights_refused(kw):
    with pytest.raises(UserError):
        EndpointDistillationTask(widelast(), FrozenTeacher(deit_teacher()), **kw)


# --- taps ------------------------------------------------------------------------------------------------
def _manual_vit_tokens(model, x, index=None):
    """Plain block loop of a timm ViT-family model up to block ``index`` (None: all); prefix tokens dropped,
    no final norm."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.norm_pre(model.patch_drop(h))
    for blk in model.blocks[: None if index is None else index + 1]:
        h = blk(h)
    return h[:, model.num_prefix_tokens:]


def _teacher_tokens(teacher, x, layer=None):
    cfg = teacher.pretrained_cfg  # same normalization on both sides: the tap alone is under test
    _, tokens, grid = FrozenTeacher(teacher, layer, student_mean=cfg["mean"], student_std=cfg["std"])(x)
    return tokens, grid


def test_deit_teacher_endpoint_vs_forward_intermediates():
    torch.manual_seed(0)
    model, x = deit_teacher().eval(), torch.randn(2, 3, 32, 32)
    tokens, grid = _teacher_tokens(model, x)
    ref = model.forward_intermediates(x, indices=[1], norm=False, intermediates_only=True)[0]  # NCHW
    assert grid == (4, 4)
    assert torch.allclose(tokens, ref.flatten(2).transpose(1, 2), atol=1e-6)
    first, _ = _teacher_tokens(model, x, layer=0)
    ref0 = model.forward_intermediates(x, indices=[0], norm=False, intermediates_only=True)[0]
    assert torch.allclose(first, ref0.flatten(2).transpose(1, 2), atol=1e-6)


def test_cait_teacher_endpoint_is_last_sa_block():
    torch.manual_seed(0)
    model, x = cait_teacher().eval(), torch.randn(2, 3, 32, 32)
    tokens, grid = _teacher_tokens(model, x)
    h = model.pos_drop(model.patch_embed(x) + model.pos_embed)
    for blk in model.blocks:  # SA blocks only; class attention comes after
        h = blk(h)
    assert grid == (8, 8) and tokens.shape == (2, 64, 64)
    assert torch.allclose(tokens, h, atol=1e-6)


def test_swin_teacher_endpoint_is_last_stage():
    torch.manual_seed(0)
    model, x = swin_teacher().eval(), torch.randn(2, 3, 32, 32)
    tokens, grid = _teacher_tokens(model, x)
    h = model.patch_embed(x)
    for layer in model.layers:
        h = layer(h)  # NHWC
    assert grid == tuple(h.shape[1:3])
    assert torch.allclose(tokens, h.reshape(2, -1, h.shape[-1]), atol=1e-6)


def test_widelast_and_lift_student_endpoints():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    from timm_widelast.distill import DistillStudent
    wide = widelast().eval()
    logits, (tokens,), (grid,) = DistillStudent(wide)(x)  # one layer by default: lists of one
    assert tokens.requires_grad and grid == (4, 4)
    assert torch.allclose(tokens, _manual_vit_tokens(wide, x), atol=1e-6)
    assert torch.allclose(logits, wide(x), atol=1e-6)
    lifted = lift().eval()
    _, (tokens,), _ = DistillStudent(lifted)(x)
    ref = lifted.forward_features(x)[:, lifted.num_prefix_tokens:]  # lifted tokens, after Linear + LayerNorm
    assert tokens.shape == (2, 16, 64)
    assert torch.allclose(tokens, ref, atol=1e-6)


def test_missing_teacher_layer_refused():
    with pytest.raises(UserError, match="out of range"):
        FrozenTeacher(deit_teacher(), layer=7)
    with pytest.raises(UserError, match="no module"):
        FrozenTeacher(deit_teacher(), layer="blocks.nope")


# --- width alignment -----------------------------------------------------------------------------------
def test_width_modes():
    narrow = timm.create_model("deit_tiny_patch16_224", pretrained=False, **TINY)  # 32 wide vs teacher 64
    task = EndpointDistillationTask(narrow, FrozenTeacher(deit_teacher()), feat_loss="spectral", feat_weight=0.2)
    assert task.width_mode == "pool" and task.trainable_module.projector is None
    task = EndpointDistillationTask(widelast(), FrozenTeacher(deit_teacher()), feat_loss="mse", feat_weight=0.2)
    assert task.width_mode == "none" and task.trainable_module.projector is None
    assert task.get_task_state() == {}
    task = EndpointDistillationTask(narrow, FrozenTeacher(deit_teacher()), feat_loss="mse", feat_weight=0.2,
                                    width_align="linear")
    assert task.width_mode == "linear"
    assert set(task.get_task_state()["projector"]) == {"weight", "bias"}
    assert not any(k.startswith("projector") for k in task.get_eval_model().state_dict())
    task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))["loss"].backward()
    assert task.trainable_module.projector.weight.grad is not None
    with pytest.raises(UserError, match="width-align"):
        EndpointDistillationTask(narrow, FrozenTeacher(deit_teacher()), feat_loss="mse", feat_weight=0.2,
                                 width_align="none")


# --- the teacher -----------------------------------------------------------------------------------------
def test_teacher_frozen_through_training_steps():
    torch.manual_seed(0)
    teacher = cait_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = EndpointDistillationTask(lift(), FrozenTeacher(teacher), distill_loss_weight=0.9,
                                    feat_loss="spectral", feat_weight=0.2)
    opt = torch.optim.AdamW(task.trainable_module.parameters(), lr=1e-2)
    task.train()
    assert not task.teacher.training and not teacher.training
    for _ in range(3):
        out = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any("teacher" in k for k in task.trainable_module.state_dict())


def test_teacher_preprocessing_converts_norm_and_resizes():
    teacher = deit_teacher(img_size=48)  # its cfg mean/std are 0.5, the student's ImageNet defaults
    wrapped = FrozenTeacher(teacher, student_mean=(0.485, 0.456, 0.406), student_std=(0.229, 0.224, 0.225))
    x = torch.randn(2, 3, 32, 32)
    s_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    s_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    t_mean = torch.tensor(teacher.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    t_std = torch.tensor(teacher.pretrained_cfg["std"]).view(1, 3, 1, 1)
    pixels = x * s_std + s_mean
    ref = F.interpolate((pixels - t_mean) / t_std, size=(48, 48), mode="bicubic", antialias=True)
    assert torch.allclose(wrapped.preprocess(x), ref, atol=1e-5)
    _, tokens, grid = wrapped(x)
    assert grid == (6, 6)


def test_label_space_mismatch_refused_for_soft_kd():
    teacher = deit_teacher(num_classes=1000)
    with pytest.raises(UserError, match="label space"):
        EndpointDistillationTask(widelast(), FrozenTeacher(teacher), distill_loss_weight=0.9)
    # feature-only distillation does not use the teacher's classifier, so it is allowed
    EndpointDistillationTask(widelast(), FrozenTeacher(teacher), feat_loss="mse", feat_weight=0.2)


def test_teacher_checkpoint_by_path(tmp_path):
    from safetensors.torch import save_file

    from timm_widelast.distill import create_teacher_model
    src = deit_teacher(num_classes=3)
    save_file(src.state_dict(), str(tmp_path / "t.safetensors"))
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=3)
    loaded = create_teacher_model("vit_small_patch16_224", kwargs, str(tmp_path / "t.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), loaded.state_dict().values()))
    torch.save({"model": src.state_dict()}, tmp_path / "t.pth")
    create_teacher_model("vit_small_patch16_224", kwargs, str(tmp_path / "t.pth"))
    torch.save({"model": src.state_dict(), "evil": object.__new__(torch.nn.ReLU)}, tmp_path / "bad.pth")
    with pytest.raises(UserError):
        create_teacher_model("vit_small_patch16_224", kwargs, str(tmp_path / "bad.pth"))
    with pytest.raises(UserError, match="does not fit"):
        create_teacher_model("vit_small_patch16_224", dict(kwargs, num_classes=5), str(tmp_path / "t.safetensors"))


# --- paired layers (several feature-loss pairs) ---------------------------------------------------------
def test_paired_layers_loss_is_mean_over_pairs_aligned_per_pair():
    torch.manual_seed(0)
    student, teacher = widelast().eval(), deit_teacher().eval()  # student blocks: 32 then 64 wide; teacher 64
    task = EndpointDistillationTask(student, FrozenTeacher(teacher, student_mean=teacher.pretrained_cfg["mean"],
                                                           student_std=teacher.pretrained_cfg["std"]),
                                    feat_loss="mse", feat_weight=0.5, student_layer=[0, 1], teacher_layer=[0, 1])
    assert task.width_mode == "pool,none"  # pair 0 pools the teacher to 32 channels, pair 1 matches
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    out = task.eval()(x, y)
    s0, s1 = _manual_vit_tokens(student, x, 0), _manual_vit_tokens(student, x, 1)
    t0, t1 = _manual_vit_tokens(teacher, x, 0), _manual_vit_tokens(teacher, x, 1)
    t0_pooled = (t0[..., 0::2] + t0[..., 1::2]) / 2  # 64 -> 32: means of adjacent channel pairs
    hand = (((s0 - t0_pooled) ** 2).mean() + ((s1 - t1) ** 2).mean()) / 2
    assert s0.shape[-1] == 32 and s1.shape[-1] == 64
    assert torch.allclose(out["feat_loss"], hand, atol=1e-6)
    assert torch.allclose(out["loss"], out["task_loss"] + 0.5 * hand, atol=1e-6)


def test_paired_layers_linear_projector_per_pair_and_count_mismatch():
    task = EndpointDistillationTask(widelast(), FrozenTeacher(deit_teacher()), feat_loss="spectral", feat_weight=0.2,
                                    student_layer=[0, 1], teacher_layer=[0, 1], width_align="linear")
    projector = task.trainable_module.projector
    assert [(p.in_features, p.out_features) for p in projector] == [(32, 64), (64, 64)]
    assert set(task.get_task_state()["projector"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))["loss"].backward()
    assert all(p.weight.grad is not None for p in projector)
    with pytest.raises(UserError, match=r"2 layer\(s\) and --kd-layer 1"):
        EndpointDistillationTask(widelast(), FrozenTeacher(deit_teacher()), feat_loss="mse", feat_weight=0.2,
                                 student_layer=[0, 1], teacher_layer=[1])


# --- hard distillation -----------------------------------------------------------------------------------
def test_hard_distillation_is_ce_to_teacher_argmax():
    torch.manual_seed(0)
    student, teacher = widelast().eval(), deit_teacher().eval()
    task = EndpointDistillationTask(student, FrozenTeacher(teacher), distill_loss_weight=0.7, temperature=3.0,
                                    distillation_type="hard").eval()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    out = task(x, y)
    with torch.no_grad():
        logp = torch.log_softmax(student(x).double(), -1).numpy()
        teacher_class = teacher(task.teacher.preprocess(x)).argmax(-1).numpy()
    hard = -logp[np.arange(6), teacher_class].mean()  # no temperature: DeiT's hard distillation
    ce = -logp[np.arange(6), y.numpy()].mean()
    assert abs(out["kd_loss"].item() - hard) < 1e-5
    assert abs(out["loss"].item() - (0.3 * ce + 0.7 * hard)) < 1e-5
    with pytest.raises(UserError, match="distillation-type"):
        EndpointDistillationTask(student, FrozenTeacher(teacher), distill_loss_weight=0.7, distillation_type="x")


# --- a student wider than its teacher ----------------------------------------------------------------------
def _adaptive_windows(channels: int, out: int):
    """PyTorch's adaptive pooling windows: [floor(i*C/out), ceil((i+1)*C/out))."""
    return [(i * channels // out, -(-(i + 1) * channels // out)) for i in range(out)]


@pytest.mark.parametrize("feat_loss", ["mse", "spectral"])
def test_wider_student_is_pooled_down_to_the_teacher_as_released(feat_loss):
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_lift", lift_dim=96, **TINY).eval()  # 96 wide vs a 64-wide teacher
    teacher = deit_teacher().eval()
    cfg = teacher.pretrained_cfg
    task = EndpointDistillationTask(student, FrozenTeacher(teacher, student_mean=cfg["mean"], student_std=cfg["std"]),
                                    feat_loss=feat_loss, feat_weight=1.0)
    assert task.width_mode == "pool"
    x = torch.randn(2, 3, 32, 32)
    out = task.eval()(x, torch.tensor([0, 1]))
    with torch.no_grad():
        s_tok = student.forward_features(x)[:, student.num_prefix_tokens:].double().numpy()  # lifted tokens
        t_tok = _manual_vit_tokens(teacher, x, 1).double().numpy()
    pooled = np.stack([s_tok[..., a:b].mean(-1) for a, b in _adaptive_windows(96, 64)], -1)
    # the release's op on [B, C, H, W] maps gives the same windows
    s_map = torch.from_numpy(s_tok).transpose(1, 2).reshape(2, 96, 4, 4)
    released = F.adaptive_avg_pool3d(s_map, (64, None, None)).flatten(2).transpose(1, 2).numpy()
    assert np.allclose(pooled, released, atol=1e-12)
    if feat_loss == "mse":
        hand = ((pooled - t_tok) ** 2).mean()
    else:
        spectrum = lambda tok: np.fft.rfft2(tok.reshape(2, 4, 4, -1), axes=(1, 2), norm="ortho")  # noqa: E731
        diff = spectrum(pooled) - spectrum(t_tok)
        hand = (np.concatenate([diff.real, diff.imag]) ** 2).mean()
    assert abs(out["feat_loss"].item() - hand) < 1e-5 * max(1.0, hand)
    EndpointDistillationTask(student, FrozenTeacher(teacher), feat_loss="mse", feat_weight=1.0, width_align="pool")


# --- holding the teacher in bf16 -----------------------------------------------------------------------------
class _CountCasts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


def test_teacher_held_in_bf16_matches_autocast_within_bf16_rounding():
    torch.manual_seed(0)
    model = deit_teacher()
    cfg = model.pretrained_cfg
    autocast_teacher = FrozenTeacher(model, student_mean=cfg["mean"], student_std=cfg["std"])
    held = FrozenTeacher(copy.deepcopy(model), student_mean=cfg["mean"], student_std=cfg["std"])
    held.hold_weights_in(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in held.model.parameters())
    x = torch.randn(8, 3, 32, 32)
    ref_logits, ref_tokens, _ = autocast_teacher(x)  # float32 weights, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _CountCasts() as per_op:
            auto_logits, auto_tokens, _ = autocast_teacher(x)
        with _CountCasts() as once:
            held_logits, held_tokens, grid = held(x)
    assert grid == (4, 4) and held_tokens.dtype == torch.bfloat16
    assert per_op.casts > 10 and once.casts <= 1  # autocast casts weights in every op; held: only the input
    ulp = 2.0 ** -8  # bf16 keeps 8 significant bits
    for auto, hold, ref in ((auto_logits, held_logits, ref_logits), (auto_tokens, held_tokens, ref_tokens)):
        assert (hold.float() - auto.float()).abs().max() <= 6 * ulp * ref.abs().max()
    held_out = held(x)  # without autocast the held teacher computes in bf16 throughout
    assert held_out[0].dtype == torch.bfloat16


# --- multi-layer Lift: taps follow model.lift_tap_name ---------------------------------------------------
def test_integer_layers_tap_multi_layer_lift_projectors():
    from timm_widelast.distill import DistillStudent
    from timm_widelast.taps import resolve_tap
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_lift", lift_dim=64, lift_start=0, lift_schedule="linear", **TINY).eval()
    names = [resolve_tap(model, layer).module_name for layer in (0, 1, -1, None)]
    assert names == ["lift_norms.0", "lift_norm", "lift_norm", "lift_norm"]
    x = torch.randn(2, 3, 32, 32)
    logits, tokens, grids = DistillStudent(model, layer=[0, 1])(x)
    with torch.no_grad():  # by hand: block 0's own projector (width int(32 + 32 * 1/2) = 48), then the endpoint
        h0 = model.blocks[0](model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))))
        side = model.lift_norms["0"](model.lift_projs["0"](h0))[:, 1:]
        end = model.lift_norm(model.lift_proj(model.blocks[1](h0)))[:, 1:]
    assert [t.shape[-1] for t in tokens] == [48, 64] and grids == [(4, 4)] * 2
    assert torch.allclose(tokens[0], side, atol=1e-6) and torch.allclose(tokens[1], end, atol=1e-6)
    assert torch.allclose(logits, model(x), atol=1e-6)
    plain = timm.create_model("deit_tiny_lift", lift_dim=64, **TINY)  # one projector: earlier blocks are blocks.i
    assert resolve_tap(plain, 0).module_name == "blocks.0" and resolve_tap(plain, 1).module_name == "lift_norm"


# --- offline teacher ---------------------------------------------------------------------------------------
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty HF_HOME, in the environment and in the hub's already-read constants."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_offline_teacher_without_cached_weights_fails_at_once(offline_hub):
    from timm_widelast.distill import create_teacher_model
    start = time.monotonic()
    with pytest.raises(UserError, match="--kd-checkpoint") as err:
        create_teacher_model("vit_small_patch16_224")
    assert "--kd-no-pretrained" in str(err.value) and "offline" in str(err.value)
    assert time.monotonic() - start < 5
    create_teacher_model("vit_small_patch16_224", dict(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                       num_heads=2), pretrained=False)  # random weights need no hub


def test_offline_teacher_loads_cached_weights(offline_hub):
    from safetensors.torch import save_file

    from timm_widelast.distill import create_teacher_model
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)  # 1000 classes, as the cfg
    src = timm.create_model("vit_small_patch16_224", **kwargs)
    repo = offline_hub / "models--timm--vit_small_patch16_224.augreg_in21k_ft_in1k"  # the hub's cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(src.state_dict(), str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    loaded = create_teacher_model("vit_small_patch16_224", kwargs)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in src.state_dict().items())


def test_taps_under_gradient_checkpointing_give_the_same_gradients():
    """Hooks registered once stay quiet when checkpointed blocks are recomputed in backward."""
    torch.manual_seed(0)
    grads = []
    teacher = FrozenTeacher(deit_teacher())
    for checkpointing in (False, True):
        torch.manual_seed(0)
        student = widelast()
        student.set_grad_checkpointing(checkpointing)
        task = EndpointDistillationTask(student, teacher, feat_loss="mse", feat_weight=1.0, task_loss_weight=0.0,
                                        student_layer=[0, 1], teacher_layer=[0, 1]).train()
        task(torch.ones(2, 3, 32, 32), torch.tensor([0, 1]))["loss"].backward()
        grads.append({n: p.grad for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "blocks.0.attn.qkv.weight" in grads[0]
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
