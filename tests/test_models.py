"""The Lift / WideLast families against the paper's numbers and timm's model contract."""
from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from timm.optim import param_groups_layer_decay

import timm_widelast  # noqa: F401  (registers the models)
from timm_widelast.models._checkpoints import CheckpointMismatchError

# Small shapes keep the contract checks fast; the architecture logic is width/depth independent.
TINY = {
    "deit_tiny_lift": dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, lift_dim=64),
    "deit_tiny_widelast": dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, wide_dim=64,
                               wide_heads=4),
    "deit_small_lift": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, lift_dim=96),
    "deit_small_widelast": dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, wide_dim=96,
                                wide_heads=6),
    # Multi-layer Lift: side projectors after blocks 1 (48 wide) and 2 (the endpoint, 64).
    "deit_tiny_lift@multi": dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, lift_dim=64,
                                 lift_start=1, lift_schedule="linear"),
}
NAMES = sorted(TINY)


def arch(name: str) -> str:
    """The registered model of a TINY entry (``name@variant`` entries are extra configurations)."""
    return name.split("@")[0]


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch(name), pretrained=False, **dict(TINY[name], **kwargs))


def side_outputs(model: torch.nn.Module) -> list:
    """Capture the outputs of the multi-layer Lift's side projectors (empty for other models)."""
    captured = []
    for norm in getattr(model, "lift_norms", {}).values():
        norm.register_forward_hook(lambda module, args, output: captured.append(output))
    return captured


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Paper facts
# ---------------------------------------------------------------------------------------------

def test_parameter_counts_match_the_paper():
    with torch.device("meta"):
        assert count(timm.create_model("deit_tiny_patch16_224")) == 5_717_416
        assert count(timm.create_model("deit_tiny_lift")) == 5_983_528
        assert count(timm.create_model("deit_tiny_widelast")) == 7_313_896


def test_registered_names_are_listed():
    assert set(timm.list_models("*widelast*")) == {"deit_tiny_widelast", "deit_small_widelast"}
    assert set(timm.list_models("*lift*")) == {"deit_tiny_lift", "deit_small_lift"}
    tags = timm.list_models("deit_tiny_widelast", pretrained=True)
    assert "deit_tiny_widelast.cait_s24_softkd_mse_in1k" in tags


def test_widelast_architecture_follows_the_spec():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_widelast")
    last = model.blocks[11]
    assert tuple(last.proj_in.weight.shape) == (384, 192) and last.proj_in.bias is None
    assert last.proj_norm.eps == 1e-6 and tuple(last.proj_norm.weight.shape) == (384,)
    assert last.attn.num_heads == 6 and last.attn.head_dim == 64
    assert tuple(last.mlp.fc1.weight.shape) == (1536, 384)
    assert all(b.attn.num_heads == 3 and b.norm1.weight.shape[0] == 192 for b in model.blocks[:11])
    assert tuple(model.norm.weight.shape) == (384,) and model.norm.eps == 1e-6
    assert tuple(model.head.weight.shape) == (1000, 384)
    assert [f["num_chs"] for f in model.feature_info] == [192] * 11 + [384]


def test_lift_architecture_follows_the_spec():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_lift")
    assert tuple(model.lift_proj.weight.shape) == (384, 192) and model.lift_proj.bias is None
    assert isinstance(model.lift_norm, torch.nn.LayerNorm) and model.lift_norm.eps == 1e-5
    assert isinstance(model.norm, torch.nn.Identity)
    assert tuple(model.head.weight.shape) == (1000, 384)
    assert model.global_pool == "avg"


def test_widelast_init_is_truncated_normal_with_zero_bias():
    model = timm.create_model("deit_tiny_widelast")
    for name in ("blocks.11.proj_in.weight", "blocks.11.attn.qkv.weight", "blocks.11.mlp.fc1.weight", "head.weight"):
        weight = model.get_parameter(name)
        assert abs(weight.std().item() - 0.02) < 0.003, name
        assert abs(weight.mean().item()) < 0.002, name
    for name in ("blocks.11.attn.qkv.bias", "blocks.11.mlp.fc1.bias", "head.bias"):
        assert torch.count_nonzero(model.get_parameter(name)) == 0, name


@pytest.mark.parametrize("lift_dim", [256, 320, 384, 448])
def test_lift_width_ablation(lift_dim):
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_lift", lift_dim=lift_dim)
    assert tuple(model.lift_proj.weight.shape) == (lift_dim, 192)
    assert model.num_features == model.head_hidden_size == lift_dim
    # DeiT-Tiny without its narrow norm and head, plus projector, LayerNorm and the wide head.
    expected = 5_717_416 - 2 * 192 - (192 * 1000 + 1000) + 192 * lift_dim + 2 * lift_dim + (lift_dim * 1000 + 1000)
    assert count(model) == expected


# DeiT-Tiny pieces counted by hand (192 wide, 1000 classes), for the multi-layer Lift counts below.
DEIT_TINY_PARAMS = 5_717_416
DEIT_TINY_NORM_AND_HEAD = 2 * 192 + (192 * 1000 + 1000)


def _projector_params(width: int, in_dim: int = 192) -> int:
    return in_dim * width + 2 * width  # Linear without bias + LayerNorm weight and bias


@pytest.mark.parametrize("schedule, side_widths", [
    ("linear", {9: 256, 10: 320}),  # int(192 + 192 * k / 3)
    ("exponential", {9: 241, 10: 304}),  # int(192 * 2 ** (k / 3)): 241.9, 304.8
    ("step", {}),  # the last block only
])
def test_multi_layer_lift_follows_the_release_widths(schedule, side_widths):
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_lift", lift_start=9, lift_schedule=schedule)
    assert {int(k): m.weight.shape[0] for k, m in model.lift_projs.items()} == side_widths
    assert all(m.bias is None for m in model.lift_projs.values())
    assert {int(k): m.weight.shape[0] for k, m in model.lift_norms.items()} == side_widths
    assert tuple(model.lift_proj.weight.shape) == (384, 192) and tuple(model.head.weight.shape) == (1000, 384)
    expected = (DEIT_TINY_PARAMS - DEIT_TINY_NORM_AND_HEAD + sum(_projector_params(w) for w in side_widths.values())
                + _projector_params(384) + 384 * 1000 + 1000)
    assert count(model) == expected
    for block in range(12):
        name = model.lift_tap_name(block)
        assert name == ("lift_norm" if block == 11 else f"lift_norms.{block}" if block in side_widths else None)
    assert model.lift_tap_name(-1) == "lift_norm"


def test_default_lift_is_unchanged_by_the_multi_layer_option():
    with torch.device("meta"):
        default = timm.create_model("deit_tiny_lift")
        explicit = timm.create_model("deit_tiny_lift", lift_start=11, lift_schedule="linear")
    assert count(default) == 5_983_528
    assert list(default.state_dict()) == list(explicit.state_dict())
    assert not any(k.startswith(("lift_projs", "lift_norms")) for k in default.state_dict())


@pytest.mark.parametrize("kwargs, hint", [
    (dict(lift_start=12), "0..11"),
    (dict(lift_start=-1), "0..11"),
    (dict(lift_start=9, lift_schedule="cubic"), "linear"),
])
def test_invalid_lift_options_say_what_works(kwargs, hint):
    with pytest.raises(ValueError, match=hint):
        timm.create_model("deit_tiny_lift", **kwargs)


def test_side_projectors_run_in_every_forward_on_their_blocks():
    model = tiny("deit_tiny_lift@multi").eval()
    captured = side_outputs(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        # Independently: block 1's output through its own Linear + LayerNorm (PyTorch eps 1e-5).
        tokens = model._pos_embed(model.patch_embed(x))
        outputs = []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        proj, norm = model.lift_projs["1"], model.lift_norms["1"]
        expected = F.layer_norm(F.linear(outputs[1], proj.weight), (48,), norm.weight, norm.bias, 1e-5)
        head_in = F.layer_norm(F.linear(outputs[2], model.lift_proj.weight), (64,), model.lift_norm.weight,
                               model.lift_norm.bias, 1e-5)[:, 1:].mean(dim=1)
    assert len(captured) == 1 and torch.allclose(captured[0], expected, atol=1e-6)
    # The head reads only the endpoint projector.
    assert torch.allclose(logits, F.linear(head_in, model.head.weight, model.head.bias), atol=1e-5)
    model.forward_intermediates(x)
    assert len(captured) == 2 and torch.allclose(captured[1], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Initialisation as released
# ---------------------------------------------------------------------------------------------

def test_widelast_class_token_is_trunc_normal_002_as_released():
    kwargs = dict(img_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=1, wide_dim=64, wide_heads=1,
                  mlp_ratio=0.25, num_classes=2)
    samples = []
    for seed in range(30):
        torch.manual_seed(seed)
        samples.append(timm.create_model("deit_tiny_widelast", **kwargs).cls_token.detach().flatten())
    values = torch.cat(samples)  # 1920 draws; timm's own ViT would give std 1e-6
    assert abs(values.std().item() - 0.02) < 0.002
    assert abs(values.mean().item()) < 0.002
    model = timm.create_model("deit_tiny_widelast", **kwargs)
    model.init_weights()  # a re-initialisation keeps the released scheme
    assert model.cls_token.abs().max().item() > 1e-3


def _assert_pytorch_default_linear(linear: torch.nn.Linear) -> None:
    """kaiming_uniform(a=sqrt(5)): U(-b, b) with b = 1/sqrt(fan_in), variance b^2/3; the bias too."""
    bound = 1 / math.sqrt(linear.in_features)
    tensors = [linear.weight] + ([linear.bias] if linear.bias is not None else [])
    for tensor in tensors:
        values = tensor.detach().flatten()
        assert values.abs().max().item() <= bound
        assert values.abs().max().item() > 0.9 * bound  # fills the interval: uniform, not trunc_normal(0.02)
        assert abs(values.var().item() / (bound ** 2 / 3) - 1) < 0.12


def test_lift_projectors_and_head_keep_pytorch_default_init_as_released():
    model = tiny("deit_tiny_lift@multi", num_classes=1000)
    for linear in (model.lift_proj, model.lift_projs["1"], model.head):
        _assert_pytorch_default_linear(linear)
    assert torch.equal(model.lift_norm.weight, torch.ones(64)) and torch.equal(model.lift_norm.bias, torch.zeros(64))
    model.init_weights()
    for linear in (model.lift_proj, model.lift_projs["1"], model.head):
        _assert_pytorch_default_linear(linear)


# ---------------------------------------------------------------------------------------------
# The release's uniform-wide control students
# ---------------------------------------------------------------------------------------------

def _vit_params(width: int, depth: int = 12, patch: int = 16, image: int = 224, classes: int = 1000) -> int:
    """A DeiT/ViT in closed form: patch embed, cls + pos, per block 12 D^2 + 13 D, final norm, head."""
    tokens = (image // patch) ** 2 + 1
    block = (2 * width + (3 * width * width + 3 * width) + (width * width + width) + 2 * width
             + (4 * width * width + 4 * width) + (4 * width * width + width))
    return (3 * patch * patch * width + width) + width + tokens * width + depth * block + 2 * width \
        + width * classes + classes


@pytest.mark.parametrize("width", [204, 219])
@pytest.mark.parametrize("kind", ["scratch", "spectralkd"])
def test_uniform_wide_control_configs(width, kind):
    from timm_widelast.distill.trainer import parse_args
    from timm_widelast.utils import parse_kwargs

    assert _vit_params(192) == DEIT_TINY_PARAMS  # the formula against DeiT-Tiny's published size
    args = parse_args(["-c", f"reviewer_uniformwide_{width}_{kind}"])
    kwargs = parse_kwargs(args.model_kwargs)
    assert args.model == "deit_tiny_patch16_224" and kwargs == {"embed_dim": width, "num_heads": 3}
    with torch.device("meta"):
        model = timm.create_model(args.model, num_classes=args.num_classes, **kwargs)
    assert count(model) == _vit_params(width)  # 6,427,204 and 7,372,759
    assert model.blocks[0].attn.head_dim == width // 3
    # The release's main.py: lr 5e-4 x global batch / 512, 300 epochs, drop-path 0, batch 512 per GPU.
    assert (args.lr, args.lr_base, args.lr_base_size, args.lr_base_scale) == (None, 5e-4, 512, "linear")
    assert (args.epochs, args.batch_size, args.drop_path, args.sched_on_updates) == (300, 512, 0.0, False)
    if kind == "scratch":
        assert args.kd_model_name is None and args.feat_loss == "none" and args.distill_loss_weight == 0
    else:
        # distillation-alpha 0, beta 1, w-fft 0.2, s-id [11], t-id [23], teacher cait_s24_224.
        assert args.kd_model_name.startswith("cait_s24_224")
        assert (args.distill_loss_weight, args.feat_loss, args.feat_weight) == (0.0, "spectral", 0.2)
        assert (args.student_layer, args.kd_layer, args.width_align) == ([11], [23], "pool")


def test_widelast_width_kwargs_and_gradual_schedule():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_widelast", wide_dim=256, wide_heads=4)
        assert model.blocks[11].attn.num_heads == 4 and model.num_features == 256
        dims = [192] * 9 + [256, 320, 384]
        heads = [3] * 9 + [4, 5, 6]
        gradual = timm.create_model("deit_tiny_widelast", block_dims=dims, block_heads=heads)
        # Without wide_heads the wide block keeps the narrow head dim (192 / 3 = 64), like the release's heads_* plans.
        assert timm.create_model("deit_tiny_widelast", wide_dim=320).blocks[11].attn.num_heads == 5
    with pytest.raises(ValueError, match="head dim 64"):
        timm.create_model("deit_tiny_widelast", wide_dim=250)
    assert [f["num_chs"] for f in gradual.feature_info] == dims
    # Each width change carries its own widening projection.
    widened = [i for i, block in enumerate(gradual.blocks) if hasattr(block, "proj_in")]
    assert widened == [9, 10, 11]
    assert tuple(gradual.blocks[10].proj_in.weight.shape) == (320, 256)


@pytest.mark.parametrize("kwargs, hint", [
    (dict(wide_dim=250, wide_heads=6), "heads in"),
    (dict(wide_dim=384, wide_heads=5), "384"),
    (dict(block_dims=[192] * 12), "block_heads"),
])
def test_invalid_width_combinations_explain_what_works(kwargs, hint):
    with pytest.raises(ValueError, match=hint):
        timm.create_model("deit_tiny_widelast", **kwargs)


def test_invalid_width_message_lists_divisors():
    with pytest.raises(ValueError) as info:
        timm.create_model("deit_tiny_widelast", wide_dim=250, wide_heads=6)
    message = str(info.value)
    assert "[1, 2, 5, 10, 25]" in message and "[246, 252]" in message


# ---------------------------------------------------------------------------------------------
# timm's model contract (the checks timm's tests/test_models.py applies to deit* models)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_non_std_cfg_contract(name):
    model = tiny(name).eval()
    state_dict = model.state_dict()
    x = torch.randn(1, 3, 32, 32)
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[-1] == model.num_features == model.head_hidden_size
    assert pre_logits.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0
    pooled = model(x)
    assert pooled.shape == pre_logits.shape and torch.allclose(pooled, pre_logits)
    headless = tiny(name, num_classes=0).eval()
    assert headless(x).shape[-1] == headless.num_features
    cfg = model.pretrained_cfg
    assert cfg["classifier"] + ".weight" in state_dict
    assert cfg["first_conv"] + ".weight" in state_dict


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_gives_a_working_head(name):
    model = tiny(name).eval()
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.get_classifier() is model.head


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = tiny(name, num_classes=42).train()
    sides = side_outputs(model)  # side projectors feed only per-layer feature losses
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 42)
    (out.mean() + sum(side.mean() for side in sides)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_gives_the_same_output(name):
    model = tiny(name).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model.set_grad_checkpointing()
    assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_match_features_and_feature_info(name):
    model = tiny(name).eval()
    x = torch.randn(2, 3, 32, 32)
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(info.channels())
    for channels, reduction, out in zip(info.channels(), info.reduction(), intermediates):
        assert out.shape == (2, channels, math.ceil(32 / reduction), math.ceil(32 / reduction))
    assert torch.allclose(final, model.forward_features(x))
    # The last intermediate is the last block's patch tokens, computed independently here.
    tokens = model._pos_embed(model.patch_embed(x))
    for block in model.blocks:
        tokens = block(tokens)
    expected_last = tokens[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    assert torch.allclose(intermediates[-1], expected_last, atol=1e-6)


def test_widelast_intermediates_norm_only_where_widths_match():
    model = tiny("deit_tiny_widelast").eval()
    x = torch.randn(1, 3, 32, 32)
    plain = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    normed = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True, norm=True)
    assert torch.equal(plain[0], normed[0])  # narrow block: the wide norm cannot apply
    assert torch.allclose(normed[-1], model.norm(plain[-1]), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_features_only(name):
    model = tiny(name, features_only=True, out_indices=(0, 1, 2)).eval()
    outputs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outputs] == model.feature_info.channels()
    expected_last = TINY[name].get("wide_dim", TINY[name]["embed_dim"])
    assert model.feature_info.channels()[-1] == expected_last


@pytest.mark.parametrize("name", NAMES)
def test_prune_intermediate_layers(name):
    model = tiny(name).eval()
    kept = model.prune_intermediate_layers(indices=[1], prune_norm=False, prune_head=True)
    assert kept == [1] and len(model.blocks) == 2
    final, intermediates = model.forward_intermediates(torch.randn(1, 3, 32, 32))
    assert intermediates[0].shape[1] == TINY[name]["embed_dim"]
    assert final.shape[-1] == model.num_features


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_unknown_kwarg_groups_and_weight_decay(name):
    with torch.device("meta"):
        model = timm.create_model(arch(name), **TINY[name])
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(TypeError):
        timm.create_model(arch(name), not_a_real_kwarg=1, **TINY[name])
    model = tiny(name)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert len({g["lr_scale"] for g in groups}) > 1
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names and "pos_embed" in model.no_weight_decay()
    matcher = model.group_matcher()
    assert "blocks" in matcher and "stem" in matcher


@pytest.mark.parametrize("name", ["deit_tiny_lift", "deit_tiny_widelast", "deit_tiny_lift@multi"])
def test_torchscript_fx_and_compile(name):
    from timm.layers import set_scriptable
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    x = torch.randn(1, 3, 32, 32)
    with set_scriptable(True):
        model = tiny(name).eval()
    expected = model(x)
    scripted = torch.jit.script(model)
    assert torch.allclose(scripted(x), expected, atol=1e-5)

    _, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    assert torch.equal(next(iter(fx_model(x).values())), expected)

    compiled = torch.compile(model, backend="aot_eager")
    assert torch.allclose(compiled(x), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints in the authors' layouts
# ---------------------------------------------------------------------------------------------

def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _reference_block(x, sd, prefix, heads):
    """A pre-norm ViT block written from scratch: the authors' DeiT block, not timm's."""
    batch, tokens, width = x.shape
    h = _ln(x, sd, f"{prefix}.norm1", 1e-6)
    qkv = F.linear(h, sd[f"{prefix}.attn.qkv.weight"], sd[f"{prefix}.attn.qkv.bias"])
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) / math.sqrt(width // heads)).softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + F.linear(h, sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
    h = _ln(x, sd, f"{prefix}.norm2", 1e-6)
    h = F.gelu(F.linear(h, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"]))
    return x + F.linear(h, sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])


def _reference_stem(img, sd, patch):
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    return torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]


def authors_widelast_forward(img, sd, patch, heads, pre_logits=False):
    x = _reference_stem(img, sd, patch)
    for i, head_count in enumerate(heads):
        if f"blocks.{i}.proj_in.weight" in sd:
            x = _ln(F.linear(x, sd[f"blocks.{i}.proj_in.weight"]), sd, f"blocks.{i}.proj_norm", 1e-6)
        x = _reference_block(x, sd, f"blocks.{i}", head_count)
    x = _ln(x, sd, "norm", 1e-6)
    return x[:, 0] if pre_logits else F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


def authors_lift_forward(img, sd, patch, heads, depth, pre_logits=False):
    base = {k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")}
    x = _reference_stem(img, base, patch)
    for i in range(depth):
        x = _reference_block(x, base, f"blocks.{i}", heads)
    last = depth - 1
    x = F.linear(x, sd[f"projections.{last}.weight"])
    x = F.layer_norm(x, (x.shape[-1],), sd[f"layer_norms.{last}.weight"], sd[f"layer_norms.{last}.bias"], 1e-5)
    pooled = x[:, 1:].mean(dim=1)
    return pooled if pre_logits else F.linear(pooled, sd["head.weight"], sd["head.bias"])


def _random_like(model: torch.nn.Module, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.1 + (1.0 if k.endswith("norm.weight") else 0.0)
            for k, v in model.state_dict().items()}


def _deit_style_file(tmp_path, weights: dict, name: str) -> str:
    """A checkpoint shaped like the authors' DeiT-style training dict."""
    path = tmp_path / name
    torch.save({
        "model": weights, "model_ema": {k: v.clone() for k, v in weights.items()}, "optimizer": {"state": {}},
        "lr_scheduler": {"last_epoch": 299}, "epoch": 299, "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="deit_tiny_patch16_224", lr=2e-3),
    }, path)
    return str(path)


def _load_file(name: str, path: str, **kwargs):
    overlay = dict(file=path, custom_load=True)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def test_authors_widelast_checkpoint_gives_the_authors_logits(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, wide_dim=64, wide_heads=4,
                  num_classes=10)
    # Authors' WideLast keys are timm ViT keys plus blocks.{last}.proj_in / proj_norm.
    weights = _random_like(timm.create_model("deit_tiny_widelast", **kwargs), seed=1)
    assert "blocks.2.proj_in.weight" in weights and weights["blocks.2.proj_in.weight"].shape == (64, 32)
    model = _load_file("deit_tiny_widelast", _deit_style_file(tmp_path, weights, "widelast.pth"), **kwargs)
    img = torch.randn(3, 3, 32, 32)
    expected = authors_widelast_forward(img, weights, patch=8, heads=[2, 2, 4])
    with torch.no_grad():
        assert torch.allclose(model(img), expected, atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_authors_lift_checkpoint_maps_every_tensor(tmp_path):
    vit_kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    base = timm.create_model("deit_tiny_patch16_224", num_classes=10, **vit_kwargs)
    generator = torch.Generator().manual_seed(2)
    weights = {f"base_model.{k}": torch.randn(v.shape, generator=generator) * 0.1 for k, v in base.state_dict().items()}
    weights["projections.2.weight"] = torch.randn(64, 32, generator=generator) * 0.1
    weights["layer_norms.2.weight"] = 1 + torch.randn(64, generator=generator) * 0.1
    weights["layer_norms.2.bias"] = torch.randn(64, generator=generator) * 0.1
    weights["head.weight"] = torch.randn(10, 64, generator=generator) * 0.1
    weights["head.bias"] = torch.randn(10, generator=generator) * 0.1

    model = _load_file("deit_tiny_lift", _deit_style_file(tmp_path, weights, "lift.pth"), lift_dim=64,
                       num_classes=10, **vit_kwargs)
    loaded = model.state_dict()
    assert torch.equal(loaded["lift_proj.weight"], weights["projections.2.weight"])
    assert torch.equal(loaded["lift_norm.bias"], weights["layer_norms.2.bias"])
    assert torch.equal(loaded["blocks.1.mlp.fc2.weight"], weights["base_model.blocks.1.mlp.fc2.weight"])
    assert torch.equal(loaded["pos_embed"], weights["base_model.pos_embed"])
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(img), authors_lift_forward(img, weights, 8, 2, 3), atol=1e-5)


def _lift_release_weights(vit_kwargs: dict, widths: dict, num_classes: int, seed: int) -> dict:
    """The release's Lift layout: a whole DeiT under ``base_model.``, ``projections.i``/``layer_norms.i`` per block."""
    base = timm.create_model("deit_tiny_patch16_224", num_classes=num_classes, **vit_kwargs)
    generator = torch.Generator().manual_seed(seed)
    weights = {f"base_model.{k}": torch.randn(v.shape, generator=generator) * 0.1 for k, v in base.state_dict().items()}
    in_dim = vit_kwargs["embed_dim"]
    for block, width in widths.items():
        weights[f"projections.{block}.weight"] = torch.randn(width, in_dim, generator=generator) * 0.1
        weights[f"layer_norms.{block}.weight"] = 1 + torch.randn(width, generator=generator) * 0.1
        weights[f"layer_norms.{block}.bias"] = torch.randn(width, generator=generator) * 0.1
    last = widths[max(widths)]
    weights["head.weight"] = torch.randn(num_classes, last, generator=generator) * 0.1
    weights["head.bias"] = torch.randn(num_classes, generator=generator) * 0.1
    return weights


def test_authors_multi_layer_lift_checkpoint_maps_every_tensor(tmp_path):
    vit_kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    # The release keys projectors by 0-based block index; linear from block 1: int(32 + 32 / 2) = 48, then 64.
    weights = _lift_release_weights(vit_kwargs, {1: 48, 2: 64}, num_classes=10, seed=7)
    model = _load_file("deit_tiny_lift", _deit_style_file(tmp_path, weights, "multi.pth"), lift_dim=64,
                       lift_start=1, num_classes=10, **vit_kwargs)
    expected = {k[len("base_model."):]: v for k, v in weights.items()
                if k.startswith("base_model.") and not k.startswith(("base_model.norm.", "base_model.head."))}
    expected.update({"lift_projs.1.weight": weights["projections.1.weight"],
                     "lift_norms.1.weight": weights["layer_norms.1.weight"],
                     "lift_norms.1.bias": weights["layer_norms.1.bias"],
                     "lift_proj.weight": weights["projections.2.weight"],
                     "lift_norm.weight": weights["layer_norms.2.weight"],
                     "lift_norm.bias": weights["layer_norms.2.bias"],
                     "head.weight": weights["head.weight"], "head.bias": weights["head.bias"]})
    loaded = model.state_dict()
    assert set(loaded) == set(expected) and model.pretrained_new_keys == []
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(img), authors_lift_forward(img, weights, 8, 2, 3), atol=1e-5)


@pytest.mark.parametrize("family", ["widelast", "lift"])
def test_release_checkpoint_loads_headless_or_with_a_fresh_head(tmp_path, family):
    """num_classes=0 drops the trained head (as timm's ViTs do); another count re-initialises only the head."""
    vit_kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    if family == "widelast":
        name, kwargs = "deit_tiny_widelast", dict(vit_kwargs, wide_dim=64, wide_heads=4)
        weights = _random_like(timm.create_model(name, num_classes=10, **kwargs), seed=8)
        reference = lambda img: authors_widelast_forward(img, weights, 8, [2, 2, 4], pre_logits=True)  # noqa: E731
    else:
        name, kwargs = "deit_tiny_lift", dict(vit_kwargs, lift_dim=64)
        weights = _lift_release_weights(vit_kwargs, {2: 64}, num_classes=10, seed=8)
        reference = lambda img: authors_lift_forward(img, weights, 8, 2, 3, pre_logits=True)  # noqa: E731
    path = _deit_style_file(tmp_path, weights, f"{family}.pth")
    img = torch.randn(2, 3, 32, 32)

    headless = _load_file(name, path, num_classes=0, **kwargs)
    assert not any(k.startswith("head.") for k in headless.state_dict())
    with torch.no_grad():
        assert torch.allclose(headless(img), reference(img), atol=1e-5)

    torch.manual_seed(0)
    fresh = timm.create_model(name, num_classes=7, **kwargs)
    torch.manual_seed(0)
    relabelled = _load_file(name, path, num_classes=7, **kwargs)
    assert set(relabelled.pretrained_new_keys) == {"head.weight", "head.bias"}
    assert torch.equal(relabelled.head.weight, fresh.head.weight)  # the fresh init of the same seed
    with torch.no_grad():
        assert torch.allclose(relabelled.forward_head(relabelled.forward_features(img), pre_logits=True),
                              reference(img), atol=1e-5)


@pytest.mark.parametrize("name", ["deit_tiny_lift@multi", "deit_tiny_widelast"])
def test_local_dir_export_loads_headless_or_with_a_fresh_head(tmp_path, name):
    """The cards' embeddings snippet: create_model('local-dir:EXPORT', pretrained=True, num_classes=0)."""
    from timm.models import save_for_hf

    kwargs = dict(TINY[name], num_classes=10)
    model = tiny(name, num_classes=10).eval()
    save_for_hf(model, str(tmp_path), model_args=kwargs)
    trained = model.state_dict()
    img = torch.randn(2, 3, 32, 32)

    headless = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=0).eval()
    assert set(headless.state_dict()) == {k for k in trained if not k.startswith("head.")}
    for key, value in headless.state_dict().items():
        assert torch.equal(value, trained[key]), key
    with torch.no_grad():
        assert torch.allclose(headless(img), model.forward_head(model.forward_features(img), pre_logits=True))

    relabelled = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=3)
    assert relabelled.head.weight.shape[0] == 3
    for key, value in relabelled.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, trained[key]), key


def test_warm_start_from_deit_loads_every_narrow_tensor(tmp_path):
    from safetensors.torch import save_file

    vit_kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    deit = timm.create_model("deit_tiny_patch16_224", **vit_kwargs)
    deit_weights = _random_like(deit, seed=3)
    path = tmp_path / "deit.safetensors"
    save_file(deit_weights, str(path))
    model = timm.create_model("deit_tiny_widelast", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              wide_dim=64, wide_heads=4, **vit_kwargs)
    loaded = model.state_dict()
    for key in deit_weights:
        if key.startswith(("blocks.0.", "blocks.1.", "patch_embed", "pos_embed", "cls_token")):
            assert torch.equal(loaded[key], deit_weights[key]), key
    expected_new = {k for k in loaded if k.startswith(("blocks.2.", "norm.", "head."))}
    assert set(model.pretrained_new_keys) == expected_new

    lift = timm.create_model("deit_tiny_lift", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             lift_dim=64, **vit_kwargs)
    assert set(lift.pretrained_new_keys) == {"lift_proj.weight", "lift_norm.weight", "lift_norm.bias",
                                             "head.weight", "head.bias"}
    assert torch.equal(lift.state_dict()["blocks.2.attn.qkv.weight"], deit_weights["blocks.2.attn.qkv.weight"])

    # Headless warm starts (num_classes=0) load the same narrow tensors and create no head.
    for name, kwargs in (("deit_tiny_widelast", dict(wide_dim=64, wide_heads=4)),
                         ("deit_tiny_lift", dict(lift_dim=64, lift_start=1))):
        headless = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                     num_classes=0, **kwargs, **vit_kwargs)
        loaded = headless.state_dict()
        assert not any(k.startswith("head.") for k in loaded)
        assert torch.equal(loaded["blocks.1.mlp.fc1.weight"], deit_weights["blocks.1.mlp.fc1.weight"])
        assert not any(k.startswith("head.") for k in headless.pretrained_new_keys)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, wide_dim=64, wide_heads=4)
    weights = _random_like(timm.create_model("deit_tiny_widelast", **kwargs), seed=4)
    del weights["blocks.2.mlp.fc1.bias"]
    weights["blocks.2.extra.weight"] = torch.zeros(3)
    path = _deit_style_file(tmp_path, weights, "bad.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['blocks.2.mlp.fc1.bias'\]") as info:
        _load_file("deit_tiny_widelast", path, **kwargs)
    assert "blocks.2.extra.weight" in str(info.value)
    # A different width is a shape mismatch, not a silent partial load.
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        _load_file("deit_tiny_widelast", _deit_style_file(tmp_path, _random_like(
            timm.create_model("deit_tiny_widelast", **kwargs), 5), "w.pth"), **dict(kwargs, wide_dim=128))


class _Payload:
    pass


def test_checkpoints_with_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointMismatchError, match="refusing to unpickle"):
        _load_file("deit_tiny_widelast", str(path), **TINY["deit_tiny_widelast"])


def test_default_tag_loads_the_release_file_from_the_hub_cache(tmp_path):
    """The real pretrained path: hf_hub_download of the authors' .pth, resolved offline from a populated cache."""
    import os
    import subprocess
    import sys
    import textwrap

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, wide_dim=64, wide_heads=4)
    weights = _random_like(timm.create_model("deit_tiny_widelast", **kwargs), seed=6)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Huiyuancs--Encoding_Mismatch"
    snapshot = repo / "snapshots" / commit / "models" / "WideLast"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _deit_style_file(snapshot, weights, "pytorch_model.pth")
    torch.save(weights, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import timm, torch, timm_widelast
        from timm_widelast.errors import UserError
        model = timm.create_model('deit_tiny_widelast', pretrained=True, **{kwargs!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        print('loaded', model.pretrained_cfg['tag'])
        headless = timm.create_model('deit_tiny_widelast', pretrained=True, num_classes=0, **{kwargs!r})
        assert all(torch.equal(v, expected[k]) for k, v in headless.state_dict().items())
        assert not any(k.startswith('head.') for k in headless.state_dict())
        print('headless ok')
        # Not in the cache, offline: one clear error naming the local-file overlay.
        small = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
        for name, extra in (('deit_tiny_lift', dict(lift_dim=64)), ('deit_tiny_widelast.deit_in1k_init', {kwargs!r})):
            try:
                timm.create_model(name, pretrained=True, **dict(small, **extra))
            except UserError as err:
                assert isinstance(err, RuntimeError)
                print('offline:', err)
    """)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded cait_s24_softkd_mse_in1k" in result.stdout and "headless ok" in result.stdout
    offline = [line for line in result.stdout.splitlines() if line.startswith("offline:")]
    assert len(offline) == 2, result.stdout
    lift, warm = offline
    assert "Huiyuancs/Encoding_Mismatch" in lift and "models/Lift/pytorch_model.pth" in lift
    assert "pretrained_cfg_overlay=dict(file=" in lift and "custom_load=True" in lift
    assert "HF_HUB_OFFLINE" in lift and "pretrained=False" in lift
    assert "timm/deit_tiny_patch16_224.fb_in1k" in warm and "model.safetensors" in warm
    assert "create_model('deit_tiny_widelast.deit_in1k_init', pretrained=True" in warm


# ---------------------------------------------------------------------------------------------
# `timm-widelast models`
# ---------------------------------------------------------------------------------------------

def test_models_command_applies_kwargs_to_the_family_that_takes_them(capsys):
    from timm_widelast.cli import main

    assert main(["models", "--model-kwargs", "wide_dim=256"]) == 0  # the command's own help example
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.startswith("deit_")}
    # DeiT-Tiny with a 256-wide last block at head dim 64 (4 heads), counted by hand:
    # DeiT-Tiny - block 11 - norm - head + (192x256 proj_in + its LN) + a 256 block + norm + head.
    block = lambda d: 12 * d * d + 13 * d  # noqa: E731
    expected = DEIT_TINY_PARAMS - block(192) - DEIT_TINY_NORM_AND_HEAD + 192 * 256 + 2 * 256 + block(256) \
        + 2 * 256 + 256 * 1000 + 1000
    assert rows["deit_tiny_widelast"][1:3] == [f"{expected / 1e6:.3f}", "256"]
    assert "deit_tiny_lift" not in rows and "skipped (do not take wide_dim): deit_small_lift, deit_tiny_lift" in out

    assert main(["models", "*tiny_lift", "--model-kwargs", "lift_start=9"]) == 0
    out = capsys.readouterr().out
    assert "deit_tiny_lift" in out and "widelast" not in out
    assert main(["models", "--model-kwargs", "not_a_kwarg=1"]) == 2
    assert "error: no listed model takes all of ['not_a_kwarg']" in capsys.readouterr().err
