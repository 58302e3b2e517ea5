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
}
NAMES = sorted(TINY)


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **dict(TINY[name], **kwargs))


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


def test_widelast_width_kwargs_and_gradual_schedule():
    with torch.device("meta"):
        model = timm.create_model("deit_tiny_widelast", wide_dim=256, wide_heads=4)
        assert model.blocks[11].attn.num_heads == 4 and model.num_features == 256
        dims = [192] * 9 + [256, 320, 384]
        heads = [3] * 9 + [4, 5, 6]
        gradual = timm.create_model("deit_tiny_widelast", block_dims=dims, block_heads=heads)
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
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 42)
    out.mean().backward()
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
        model = timm.create_model(name, **TINY[name])
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(TypeError):
        timm.create_model(name, not_a_real_kwarg=1, **TINY[name])
    model = tiny(name)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert len({g["lr_scale"] for g in groups}) > 1
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names and "pos_embed" in model.no_weight_decay()
    matcher = model.group_matcher()
    assert "blocks" in matcher and "stem" in matcher


@pytest.mark.parametrize("name", ["deit_tiny_lift", "deit_tiny_widelast"])
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


def authors_widelast_forward(img, sd, patch, heads):
    x = _reference_stem(img, sd, patch)
    for i, head_count in enumerate(heads):
        if f"blocks.{i}.proj_in.weight" in sd:
            x = _ln(F.linear(x, sd[f"blocks.{i}.proj_in.weight"]), sd, f"blocks.{i}.proj_norm", 1e-6)
        x = _reference_block(x, sd, f"blocks.{i}", head_count)
    x = _ln(x, sd, "norm", 1e-6)
    return F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


def authors_lift_forward(img, sd, patch, heads, depth):
    base = {k[len("base_model."):]: v for k, v in sd.items() if k.startswith("base_model.")}
    x = _reference_stem(img, base, patch)
    for i in range(depth):
        x = _reference_block(x, base, f"blocks.{i}", heads)
    last = depth - 1
    x = F.linear(x, sd[f"projections.{last}.weight"])
    x = F.layer_norm(x, (x.shape[-1],), sd[f"layer_norms.{last}.weight"], sd[f"layer_norms.{last}.bias"], 1e-5)
    return F.linear(x[:, 1:].mean(dim=1), sd["head.weight"], sd["head.bias"])


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
        model = timm.create_model('deit_tiny_widelast', pretrained=True, **{kwargs!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        print('loaded', model.pretrained_cfg['tag'])
    """)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded cait_s24_softkd_mse_in1k" in result.stdout
