"""InfluencerFormer model: output format, variable N per batch, padding does not leak."""

import pytest
import torch

from ifsearch.config import ModelConfig
from ifsearch.models import ImageInfluencerFormer, InfluencerFormer, knn_indices, sine_position_2d


def scenes(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 6, generator=g) for n in sizes]


@pytest.mark.parametrize("masked", [False, True])
def test_outputs_follow_mask2former_format(masked):
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=32, num_queries=7, decoder_layers=3, num_heads=4,
                         masked_attention=masked)
    out = InfluencerFormer(config, num_classes=4)(scenes(50, 80, 33))
    assert out["pred_logits"].shape == (3, 7, 5)
    assert [m.shape for m in out["pred_masks"]] == [(50, 7), (80, 7), (33, 7)]
    assert len(out["aux_outputs"]) == 3  # initial queries + 2 intermediate layers
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (3, 7, 5)
        assert [m.shape for m in aux["pred_masks"]] == [(50, 7), (80, 7), (33, 7)]


@pytest.mark.parametrize("masked", [False, True])
def test_scene_outputs_do_not_depend_on_batch_padding(masked):
    torch.manual_seed(0)
    model = InfluencerFormer(ModelConfig(embed_dim=32, masked_attention=masked), num_classes=3)
    model.eval()
    small, large = scenes(40, 120)
    alone = model([small])
    batched = model([small, large])
    assert torch.allclose(alone["pred_masks"][0], batched["pred_masks"][0], atol=1e-5)
    assert torch.allclose(alone["pred_logits"][0], batched["pred_logits"][0], atol=1e-5)


def test_gradients_reach_encoder_and_queries():
    model = InfluencerFormer(ModelConfig(embed_dim=16, num_heads=2), num_classes=2)
    out = model(scenes(30, 20))
    loss = sum(m.sum() for m in out["pred_masks"]) + out["pred_logits"].sum()
    loss.backward()
    assert model.encoder.input_proj.weight.grad.abs().sum() > 0
    assert model.decoder.query_feat.weight.grad.abs().sum() > 0


def test_knn_includes_self_and_matches_brute_force():
    xyz = torch.rand(300, 3)
    idx = knn_indices(xyz, k=5, chunk_size=64)  # several chunks
    brute = torch.cdist(xyz, xyz).topk(5, largest=False).indices
    assert torch.equal(idx[:, 0], torch.arange(300))
    assert torch.equal(idx.sort(1).values, brute.sort(1).values)
    assert knn_indices(torch.rand(3, 3), k=10).shape == (3, 3)  # k capped at N


def test_knn_memory_bound_gives_the_same_neighbours():
    xyz = torch.rand(500, 3)
    assert torch.equal(knn_indices(xyz, k=6, max_elements=1000).sort(1).values,
                       knn_indices(xyz, k=6).sort(1).values)


def image_config(**kw):
    return ModelConfig(embed_dim=32, num_queries=6, decoder_layers=3, num_heads=4, ffn_dim=64,
                       backbone_channels=[16, 24, 32], **kw)


@pytest.mark.parametrize("masked", [False, True])
def test_image_model_outputs_follow_mask2former_format(masked):
    torch.manual_seed(0)
    model = ImageInfluencerFormer(image_config(masked_attention=masked), num_classes=3)
    out = model(torch.randn(2, 3, 64, 64))
    assert out["pred_logits"].shape == (2, 6, 4)
    assert out["pred_masks"].shape == (2, 6, 16, 16)  # stride 4
    assert len(out["aux_outputs"]) == 3
    assert all(a["pred_masks"].shape == (2, 6, 16, 16) for a in out["aux_outputs"])
    assert torch.isfinite(out["pred_masks"]).all()


def test_image_model_images_are_independent_and_gradients_reach_backbone():
    torch.manual_seed(0)
    model = ImageInfluencerFormer(image_config(masked_attention=True), num_classes=2).eval()
    images = torch.randn(2, 3, 64, 96)  # non-square works too
    alone = model(images[:1])
    both = model(images)
    assert torch.allclose(alone["pred_masks"][0], both["pred_masks"][0], atol=1e-4)
    model.train()
    out = model(images)
    (out["pred_masks"].sum() + out["pred_logits"].sum()).backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert model.decoder.level_embed.weight.grad.abs().sum() > 0


def test_sine_position_encoding_distinguishes_every_pixel():
    pos = sine_position_2d(5, 7, 32, torch.device("cpu"))
    assert pos.shape == (35, 32)
    assert torch.cdist(pos, pos).add(torch.eye(35)).min() > 1e-3
    assert sine_position_2d(3, 3, 30, torch.device("cpu")).shape == (9, 30)


@pytest.mark.parametrize("images", [False, True])
def test_every_parameter_gets_a_gradient(images):
    """DDP (Ray Train workers) fails on parameters that take no part in the loss."""
    torch.manual_seed(0)
    if images:
        model = ImageInfluencerFormer(image_config(masked_attention=True), num_classes=2)
        out = model(torch.randn(2, 3, 32, 32))
        masks = out["pred_masks"].sum()
    else:
        model = InfluencerFormer(ModelConfig(embed_dim=16, num_heads=2, masked_attention=True),
                                 num_classes=2)
        out = model(scenes(30, 20))
        masks = sum(m.sum() for m in out["pred_masks"])
    (masks + out["pred_logits"].sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


def test_masked_attention_reads_the_mask_as_the_loss_does():
    """Blocked where p < 0.5 in the configured mode: a logit above 0 is p > 0.5 for a sigmoid but
    not for a softmax over the queries and a background slot."""
    from ifsearch.models import MaskDecoder

    # Four points, two queries: (L, M) logits.
    logits = torch.tensor([[2.0, -3.0],  # sigmoid .88/.05; softmax e^2 / (1 + e^2 + e^-3) = .88
                           [1.0, 1.0],  # sigmoid .73 each; softmax e / (1 + 2e) = .42 each
                           [-3.0, 2.0],
                           [-1.0, -1.0]])[None]  # (B=1, L=4, M=2)
    expected = {  # (M, L) True = blocked
        "sigmoid": [[False, False, True, True], [True, False, False, True]],
        "softmax": [[False, True, True, True], [True, True, False, True]],
    }
    for mask_prob, blocked in expected.items():
        decoder = MaskDecoder(dim=8, num_classes=2, num_queries=2, num_layers=1, num_heads=2,
                              ffn_dim=8, masked_attention=True, mask_prob=mask_prob)
        got = decoder._attention_mask(logits, padding=None)  # (B * heads, M, L)
        assert got.tolist() == [blocked, blocked], mask_prob


def test_build_model_gives_masked_attention_the_criterion_mask_prob():
    from ifsearch.config import Config
    from ifsearch.train import build_model

    config = Config()
    config.model.embed_dim, config.model.num_heads = 16, 2
    for name, mask_prob, expected in [("influencer", "softmax", "softmax"),
                                      ("influencer", "sigmoid", "sigmoid"),
                                      ("hungarian", "softmax", "sigmoid")]:
        config.loss.name, config.loss.mask_prob = name, mask_prob
        assert build_model(config, 3).decoder.mask_prob == expected
    config.data.name = "coco"
    config.loss.name, config.loss.mask_prob = "influencer", "softmax"
    config.model.backbone_channels = [8, 16]
    assert build_model(config, 3).decoder.mask_prob == "softmax"
