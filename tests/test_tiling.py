import numpy as np
import pytest

from sv_deploy.backends import TorchBackend
from sv_deploy.config import ArchConfig
from sv_deploy.enhance import InferenceOptions, back_project, enhance_block, enhance_volume
from sv_deploy.resize import bp_reach, downsample, upsample
from sv_deploy.tiling import block_core, plan_tiles, read_overhead, total_halo


@pytest.mark.parametrize("shape,core,factors", [((10, 33, 40), (4, 16, 9), (2, 2, 2)), ((1, 20, 21), (1, 8, 8), (1, 3, 2))])
def test_tiles_cover_the_output_exactly_once(shape, core, factors):
    tiles = plan_tiles(shape, core, (3, 3, 3), factors)
    cover = np.zeros([n * f for n, f in zip(shape, factors)], np.int32)
    for t in tiles:
        cover[tuple(slice(*s) for s in t.out)] += 1
        for (r0, r1), (c0, c1), (o0, o1), f in zip(t.read, t.core, t.out, factors):
            assert r0 <= c0 < c1 <= r1
            assert (o0, o1) == (c0 * f, c1 * f)
    assert (cover == 1).all()


def test_halo_grows_with_back_projection_and_shrinks_through_stages():
    arch = ArchConfig(mid_layers=4)
    assert total_halo([(2, 2, 2)], arch, 0) == (8, 8, 8)
    assert total_halo([(1, 2, 2)], arch, 2) == (8, 8 + bp_reach(2, 2), 8 + bp_reach(2, 2))
    # second stage radius counted in stage-1 input voxels: ceil(8 / 2) = 4
    assert total_halo([(2, 2, 2), (2, 2, 2)], arch, 0) == (12, 12, 12)
    # only the last stage back-projects, against the input over the total factors (x4)
    first, second = 8, 4 + bp_reach(4, 3)
    assert total_halo([(2, 2, 2), (2, 2, 2)], arch, 3) == (first + second,) * 3
    assert total_halo([(2, 2, 2), (2, 2, 2)], arch, 3, start=1) == (2 * second,) * 3  # in stage 2's input voxels
    assert total_halo([(2, 2, 2), (2, 2, 2)], arch, 3, start=2) == (0, 0, 0)


def test_a_chain_of_stages_is_consistent_with_its_input(trained_small):
    """After two x2 stages the result shrunk x4 by the degradation model gives back the input, as
    tricubic + back-projection does: stage 1's raw output goes to stage 2, whose output alone is
    back-projected, against the input at x4 (not against stage 1's result)."""
    import copy

    stage, _, x, _ = trained_small
    backend = TorchBackend([stage, copy.deepcopy(stage)], stage.interp_weight.device)
    block = x[:10, :40, :36]
    result = enhance_block(backend, [(2, 2, 2)] * 2, ArchConfig(), block, InferenceOptions(ensemble=False, bp_iters=10))
    baseline = back_project(upsample(block, (4, 4, 4)), block, (4, 4, 4), 10)
    mismatch = [np.abs(downsample(y, (4, 4, 4)) - block).max() / np.ptp(block) for y in (result, baseline)]
    assert mismatch[0] < 2 * mismatch[1]
    raw = InferenceOptions(ensemble=False, bp_iters=0)
    nets = enhance_block(backend, [(2, 2, 2)], ArchConfig(), enhance_block(backend, [(2, 2, 2)], ArchConfig(), block, raw), raw)
    np.testing.assert_allclose(result, back_project(nets, block, (4, 4, 4), 10), rtol=0, atol=1e-5 * np.ptp(block))
    # the stages alone, chained: the second back-projects against the first's estimate only
    first = enhance_block(backend, [(2, 2, 2)], ArchConfig(), block, InferenceOptions(ensemble=False, bp_iters=10))
    alone = enhance_block(backend, [(2, 2, 2)], ArchConfig(), first, InferenceOptions(ensemble=False, bp_iters=10))
    assert np.abs(downsample(alone, (4, 4, 4)) - block).max() / np.ptp(block) > 5 * mismatch[1]


@pytest.mark.parametrize("chained,bp_iters", [(1, 0), (1, 2), (1, 10), (2, 0), (2, 3)])
def test_tiled_equals_whole_volume_for_a_trained_model(trained_small, chained, bp_iters):
    """x2, and x4 as two chained stages (stage 2 runs on stage 1's output trimmed to what it needs)."""
    import copy

    stage, _, x, _ = trained_small
    modules = [stage] + [copy.deepcopy(stage) for _ in range(chained - 1)]
    backend = TorchBackend(modules, stage.interp_weight.device)
    arch = ArchConfig()
    factors = [(2, 2, 2)] * chained
    block, tile = (x, (6, 20, 24)) if chained == 1 else (x[:10, :40, :36], (4, 12, 12))
    options = InferenceOptions(ensemble=True, bp_iters=bp_iters, tile=tile)
    scale = 2 ** chained
    assert len(plan_tiles(block.shape, tile, total_halo(factors, arch, bp_iters), (scale,) * 3)) >= 8
    whole = enhance_block(backend, factors, arch, block, options)
    tiled = enhance_volume(backend, factors, arch, block, options)
    assert tiled.shape == whole.shape == tuple(scale * n for n in block.shape)
    assert np.abs(tiled - whole).max() <= 1e-5 * np.ptp(whole)


@pytest.mark.parametrize("shape,halo,max_read", [((76, 234, 204), 8, 2_000_000), ((1, 300, 290), 8, 40_000),
                                                  ((9, 40, 30), 3, 2_000)])
def test_network_sub_blocks_fit_and_cover(shape, halo, max_read):
    core = block_core(shape, halo, max_read)
    parts = plan_tiles(shape, core, (halo,) * 3, (1, 1, 1))
    cover = np.zeros(shape, np.int32)
    for p in parts:
        assert np.prod([r1 - r0 for r0, r1 in p.read]) <= max_read
        cover[tuple(slice(*s) for s in p.core)] += 1
    assert (cover == 1).all()
    # no split when everything fits
    assert block_core(shape, halo, int(np.prod(shape))) == shape


@pytest.mark.parametrize("chained", [1, 2])
def test_network_on_sub_blocks_equals_one_pass(trained_small, chained):
    """The network run on sub-blocks with its own halo, stitched, equals one pass over the block."""
    import copy

    stage, _, x, _ = trained_small
    backend = TorchBackend([stage] + [copy.deepcopy(stage) for _ in range(chained - 1)], stage.interp_weight.device)
    arch, factors = ArchConfig(), [(2, 2, 2)] * chained
    block = x[:8, :30, :28]
    max_read = 5_000
    core = block_core(block.shape, arch.halo(), max_read)
    assert len(plan_tiles(block.shape, core, (arch.halo(),) * 3, (1, 1, 1))) >= 4
    one = enhance_block(backend, factors, arch, block, InferenceOptions(bp_iters=2))
    split = enhance_block(backend, factors, arch, block, InferenceOptions(bp_iters=2, block=max_read))
    assert np.abs(split - one).max() <= 1e-5 * np.ptp(one)


@pytest.mark.parametrize("shape, core, halo", [((16, 64, 64), (16, 64, 64), (6, 6, 6)), ((16, 64, 64), (4, 8, 8), (6, 6, 6)),
                                               ((7, 33, 20), (3, 10, 9), (2, 5, 0))])
def test_read_overhead_counts_what_the_tiles_read(shape, core, halo):
    tiles = plan_tiles(shape, core, halo, (1, 1, 1))
    read = sum(np.prod([r1 - r0 for r0, r1 in t.read]) for t in tiles)
    assert read_overhead(shape, core, halo) == pytest.approx(read / np.prod(shape))
