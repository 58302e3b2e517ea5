"""Loss terms vs hand computations, endpoint taps vs plain forwards, and the frozen teacher."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

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

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def widelast():
    return timm.create_model("deit_tiny_widelast", wide_dim=64, wide_heads=2, **TINY)


def lift():
    return timm.create_model("deit_tiny_lift", lift_dim=64, **TINY)


def deit_teacher(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10) | kw
    return timm.create_model("vit_small_patch16_224", pretrained=False, **args)


def cait_teacher():
    return timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=4, embed_dim=64,
                             depth=2, num_heads=2, num_classes=10)


def swin_teacher():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                             embed_dim=32, depths=(1, 1), num_heads=(2, 2), window_size=4, num_classes=10)


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
def _manual_vit_tokens(model, x):
    """Plain block loop of a timm ViT-family model, prefix tokens dropped, no final norm."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.norm_pre(model.patch_drop(h))
    for blk in model.blocks:
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
    logits, tokens, grid = DistillStudent(wide)(x)
    assert tokens.requires_grad and grid == (4, 4)
    assert torch.allclose(tokens, _manual_vit_tokens(wide, x), atol=1e-6)
    assert torch.allclose(logits, wide(x), atol=1e-6)
    lifted = lift().eval()
    _, tokens, _ = DistillStudent(lifted)(x)
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
