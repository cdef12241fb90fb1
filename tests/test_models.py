"""The backbone registry: specs, the backbone contract, torchvision / timm weight layouts."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from selfsup.models import available_backbones, backbone_spec, build_backbone, register_backbone


def test_spec_forms_normalise_to_name_and_kwargs():
    want = {"name": "resnet10", "kwargs": {"cifar_stem": True, "width": 8}}
    assert backbone_spec({"name": "resnet10", "cifar_stem": True, "width": 8}) == want  # format-1 flat form
    assert backbone_spec({"name": "resnet10", "kwargs": {"cifar_stem": True, "width": 8}}) == want
    assert backbone_spec("resnet10", cifar_stem=True, width=8) == want
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'.*resnet18"):
        backbone_spec("resnet7")
    with pytest.raises(ValueError, match="rejected its arguments.*stem"):
        build_backbone("resnet18", stem=True)


def test_every_backbone_states_its_features_and_no_weight_decay():
    assert {"resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base"} <= set(available_backbones())
    r = build_backbone("resnet18")
    assert r.num_features == 512 and r.no_weight_decay() == set()
    assert build_backbone("resnet50").num_features == 2048
    assert build_backbone("resnet10", width=8, cifar_stem=True)(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    v = build_backbone("vit_small", img_size=32, patch_size=4, depth=1)
    assert v.num_features == 384 and {"pos_embed", "cls_token"} <= v.no_weight_decay()
    assert v.patch_embed.num_patches == 64 and v(torch.randn(2, 3, 32, 32)).shape == (2, 384)
    assert build_backbone("vit_tiny", img_size=32, patch_size=2, depth=1).patch_embed.num_patches == 256
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_backbone("vit_tiny", img_size=30, patch_size=4)


def test_a_builder_that_breaks_the_contract_is_rejected():
    @register_backbone(name="_bad_test_backbone")
    def bad(**kw):
        return torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="num_features and no_weight_decay"):
        build_backbone("_bad_test_backbone")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(name="_bad_test_backbone")(bad)


def test_resnet_keys_are_torchvision_keys():
    torch.manual_seed(0)
    ours = build_backbone("resnet18").eval()
    ref = torchvision.models.resnet18()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ref.eval()(x), ours(x))


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_weights_load_into_an_unmodified_timm_model(pool):
    torch.manual_seed(0)
    ours = build_backbone("vit_tiny", img_size=32, patch_size=4, global_pool=pool).eval()
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, global_pool=pool)
    ref.load_state_dict(ours.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ref.eval()(x), ours(x))
