import json

import numpy as np
import pytest
import torch

from sv_deploy.config import ArchConfig, ModelConfig, TrainConfig
from sv_deploy.model import SVStage, count_parameters, pixel_shuffle_3d
from sv_deploy.resize import upsample

from reference import shuffle_reference


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 3), (3, 2, 1), (1, 4, 4)])
@pytest.mark.parametrize("channels_out", [1, 2])
def test_pixel_shuffle_matches_numpy_reference(factors, channels_out):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, channels_out * int(np.prod(factors)), 3, 4, 5)).astype(np.float32)
    got = pixel_shuffle_3d(torch.from_numpy(x), factors).numpy()
    np.testing.assert_array_equal(got, shuffle_reference(x, factors))


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (1, 3, 3), (2, 1, 4)])
@pytest.mark.parametrize("shape", [(6, 12, 11), (2, 1, 5)])
def test_untrained_stage_is_cubic_interpolation_up_to_the_border(factors, shape):
    """Its interpolation path mirrors at borders as the degradation model does, so a stage that
    learns nothing is exactly the tricubic baseline, border voxels included (lengths 1 and 2
    mirror more than once)."""
    stage = SVStage(factors)
    torch.nn.init.zeros_(stage.expand.weight)
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    got = stage(torch.from_numpy(x)[None, None])[0, 0].detach().numpy()
    np.testing.assert_allclose(got, upsample(x, factors), atol=2e-6)


def test_older_model_files_read_as_trained_with_squared_error_alone():
    data = json.loads(ModelConfig(stages=((2, 2, 2),)).to_json())
    assert data["train"]["l1_weight"] == TrainConfig().l1_weight > 0
    del data["train"]["l1_weight"]
    assert ModelConfig.from_json(json.dumps(data)).train.l1_weight == 0.0
    assert TrainConfig.paper().l1_weight == 0.0  # the paper's loss
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="l1_weight"):
            TrainConfig(l1_weight=bad)


def test_replicate_border_of_older_model_files_is_kept():
    """Files written before `interp_border` existed load with the border they were trained with."""
    data = json.loads(ModelConfig(stages=((2, 2, 2),)).to_json())
    del data["arch"]["interp_border"]
    old = ModelConfig.from_json(json.dumps(data))
    assert old.arch.interp_border == "replicate"
    stage = SVStage((2, 2, 2), old.arch)
    torch.nn.init.zeros_(stage.expand.weight)
    x = np.random.default_rng(0).random((4, 6, 6)).astype(np.float32)
    got = stage(torch.from_numpy(x)[None, None])[0, 0].detach().numpy()
    ref = upsample(x, (2, 2, 2))
    np.testing.assert_allclose(got[4:-4, 4:-4, 4:-4], ref[4:-4, 4:-4, 4:-4], atol=2e-6)
    assert np.abs(got - ref).max() > 1e-3  # replicate, not mirrored, at the border


def test_parameter_count_in_papers_range():
    """The paper says "about 8-22 thousand" parameters: our default (m=2) and the authors' m=4."""
    full = count_parameters(SVStage((2, 2, 2)))
    assert 0.95 * 8_000 <= full <= 22_000
    authors = count_parameters(SVStage((2, 2, 2), ArchConfig(mid_layers=4)))
    assert 8_000 <= authors <= 22_000 and authors > full
    assert count_parameters(SVStage((2, 2, 2), ArchConfig(groups=2))) < full


def test_two_d_input_keeps_depth_one():
    stage = SVStage((1, 2, 2))
    y = stage(torch.rand(1, 1, 1, 10, 12))
    assert tuple(y.shape) == (1, 1, 1, 20, 24)


@pytest.mark.parametrize("padding", ["replicate", "zeros"])
def test_single_plane_shortcut_equals_the_3d_convolution(padding):
    from sv_deploy.model import single_plane_conv

    torch.manual_seed(0)
    stage = SVStage((1, 2, 2), ArchConfig(padding=padding, groups=2))
    x = torch.rand(2, 1, 1, 9, 11)
    with torch.no_grad():
        for layer in (*stage.extract, *stage.shrink, *stage.mid, stage.expand):
            if isinstance(layer, torch.nn.Conv3d):
                feed = torch.rand(2, layer.in_channels, 1, 9, 11)
                torch.testing.assert_close(single_plane_conv(layer, feed), layer(feed), rtol=1e-5, atol=1e-5)
        full = stage.expand(stage.mid(stage.shrink(stage.extract(x))))
        torch.testing.assert_close(stage.residual_phases(x), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factors,shape", [((2, 2, 2), (3, 1, 6, 9, 8)), ((1, 2, 2), (4, 1, 1, 12, 10))])
def test_cpu_backend_one_sample_per_pass_equals_the_batched_stage(factors, shape):
    from sv_deploy.backends import TorchBackend

    torch.manual_seed(0)
    stage = SVStage(factors).eval()
    for p in stage.parameters():
        p.data.normal_(0, 0.1)
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    with torch.inference_mode():
        batched = stage(torch.from_numpy(x)).numpy()
    got = TorchBackend([stage], torch.device("cpu")).predict(0, x)
    assert got.shape == batched.shape
    np.testing.assert_allclose(got, batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,pads", [((1, 6, 5, 7, 9), (1, 1, 1, 1, 1, 1)), ((2, 3, 4, 6, 5), (2, 0, 0, 3, 1, 2)),
                                        ((1, 1, 3, 3, 3), (4, 4, 4, 4, 4, 4)), ((1, 6, 9, 11), (1, 2, 0, 1))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_replicate_pad_equals_torchs_and_keeps_the_layout(shape, pads, channels_last):
    from sv_deploy.model import replicate_pad

    x = torch.rand(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    got = replicate_pad(x, pads)
    assert torch.equal(got, torch.nn.functional.pad(x, pads, mode="replicate"))  # pads wider than the axis too
    if channels_last and shape[1] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("factors,shape,padding,members", [
    ((2, 2, 2), (1, 1, 5, 40, 40), "replicate", 1), ((2, 2, 2), (1, 1, 5, 40, 40), "zeros", 1),
    ((2, 2, 2), (1, 1, 5, 40, 40), "reflect", 1), ((2, 2, 2), (1, 1, 5, 40, 40), "circular", 1),
    ((2, 2, 2), (1, 1, 5, 40, 40), "replicate", 3),  # grouped layers: three networks side by side
    ((1, 2, 2), (1, 1, 1, 12, 12), "replicate", 1), ((1, 2, 2), (1, 1, 1, 12, 12), "zeros", 1)])
def test_cpu_inference_runs_every_convolution_in_onednn_with_the_modules_result(factors, shape, padding, members):
    """A thin block (the 5-plane bead example) or a small plane, one sample a pass: torch's own
    rule sent their 3x3 layers to its slow reference kernel, several times slower."""
    import copy

    from torch.profiler import profile

    from sv_deploy.backends import TorchBackend

    torch.manual_seed(0)
    stage = SVStage(factors, ArchConfig(padding=padding, members=members)).eval()
    for p in stage.parameters():
        p.data.normal_(0, 0.1)
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    want = stage(torch.from_numpy(x)).detach().numpy()  # autograd on: the modules' own calls
    backend = TorchBackend([copy.deepcopy(stage)], torch.device("cpu"))
    with profile() as prof:
        got = backend.predict(0, x)
    names = {event.name for event in prof.events()}
    assert "aten::mkldnn_convolution" in names and not [n for n in names if "slow_conv" in n], sorted(names)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factors,groups,shape", [((2, 2, 2), 1, (2, 1, 6, 9, 8)), ((1, 2, 2), 2, (2, 1, 1, 10, 12))])
def test_merged_members_output_the_mean_of_the_members(factors, groups, shape):
    from sv_deploy.model import merge_members

    torch.manual_seed(0)
    members = [SVStage(factors, ArchConfig(groups=groups)).eval() for _ in range(3)]
    for m in members:
        for p in m.parameters():
            p.data.normal_(0, 0.1)
    merged = merge_members(members)
    assert merged.arch.members == 3
    assert count_parameters(merged) == 3 * count_parameters(members[0]) - 2 * (merged.expand.bias.numel())
    x = torch.rand(*shape)
    with torch.no_grad():
        mean = sum(m(x) for m in members) / 3
        torch.testing.assert_close(merged(x), mean, rtol=1e-5, atol=1e-5)
        assert (members[0](x) - mean).abs().max() > 1e-3  # the members really differ


@pytest.mark.parametrize("factors, members, depth", [((2, 2, 2), 1, 6), ((1, 2, 2), 3, 6), ((1, 2, 4), 1, 6),
                                                    ((3, 3, 3), 1, 6), ((1, 2, 2), 1, 1)])
def test_folded_ensemble_equals_the_ensemble_of_passes(factors, members, depth):
    """One pass of the folded network = the mean of the network over the turned and flipped
    inputs, each turned back (the recipe's 8-way ensemble; 4-way when y and x factors differ)."""
    from sv_deploy.backends import TorchBackend
    from sv_deploy.enhance import predict_ensemble
    from sv_deploy.geometry import ensemble_transforms
    from sv_deploy.model import fold_ensemble, merge_members

    torch.manual_seed(0)
    stage = merge_members([SVStage(factors) for _ in range(members)])
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # far from interpolation, so every weight matters
    transforms = ensemble_transforms(factors, True)
    folded = fold_ensemble(stage, transforms)
    assert folded.arch.members == members * len(transforms)
    x = np.random.default_rng(1).random((depth, 13, 11)).astype(np.float32)  # y != x: turns change the shape
    want = predict_ensemble(TorchBackend([stage], torch.device("cpu")), 0, x, transforms)
    with torch.no_grad():
        got = folded(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
