"""The discriminator: frozen teacher encoder features, head pool sampling, gradients, refresh, crops, losses."""

import math

import pytest
import torch

from trainer.conditioning import Conditioning
from trainer.config import TASKS, PoolConfig, UNetConfig
from trainer.discriminator import FrozenEncoder, HeadPool, Views, d_loss, encoder_features, g_loss, random_crops
from trainer.models import alphas_cumprod, build_unet

LATENT, CTX_LEN, CTX_DIM = 8, 6, 16


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4,
                                 cross_attn=(False, True)), LATENT, CTX_DIM, latent_channels=4)
    return FrozenEncoder(unet)


def make_pool(encoder, **kw):
    torch.manual_seed(0)
    cfg = PoolConfig(heads_per_slot=3, head_channels=8, **kw)
    return HeadPool(cfg, encoder.shapes(LATENT))


def features(encoder, pool, heads, x0=None, gen_seed=0):
    b = 2
    x0 = torch.randn(b, 4, LATENT, LATENT) if x0 is None else x0
    cond, uncond = Conditioning(torch.randn(b, CTX_LEN, CTX_DIM)), Conditioning(torch.zeros(b, CTX_LEN, CTX_DIM))
    tasks = pool.tasks_of(heads)
    views = Views.draw(torch.Generator().manual_seed(gen_seed), tuple(x0.shape), tasks, 0.5)
    return encoder_features(encoder, x0, 250, cond, uncond, tasks, alphas_cumprod(), views)


def test_encoder_returns_every_level_and_is_frozen(encoder):
    # conv_in, block 1 (resnet + downsampler), block 2 (resnet), mid block
    shapes = encoder.shapes(LATENT)
    assert shapes == [(8, 8), (8, 8), (8, 4), (16, 4), (16, 4)]
    assert not any(p.requires_grad for p in encoder.parameters())


def test_pool_size_and_subset_sampling(encoder):
    pool = make_pool(encoder)
    levels = len(pool.level_shapes)
    assert len(pool) == 4 * levels * 3 * 3  # t* x levels x tasks x replicas
    heads = pool.sample(500, torch.Generator().manual_seed(1))
    assert len(heads) == levels * 3  # one replica per (level, task) of the drawn t*
    slots = [pool.slot_of(h) for h in heads]
    assert {s[0] for s in slots} == {500} and len(set(slots)) == len(slots)
    assert {s[2] for s in slots} == set(TASKS)
    # different draws pick different replicas; the same generator seed picks the same heads (DDP ranks agree)
    draws = {tuple(pool.sample(500, torch.Generator().manual_seed(s))) for s in range(10)}
    assert len(draws) > 1
    assert pool.sample(10, torch.Generator().manual_seed(3)) == pool.sample(10, torch.Generator().manual_seed(3))


def test_only_sampled_heads_get_gradients_and_change(encoder):
    pool = make_pool(encoder)
    opt = torch.optim.AdamW(pool.parameters(), lr=1e-2)
    heads = pool.sample(250, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in pool.parameters()]
    real = features(encoder, pool, heads, gen_seed=1)
    fake = features(encoder, pool, heads, gen_seed=2)
    loss = d_loss(pool(real, heads), pool(fake, heads), "softplus")
    loss.backward()
    for i, head in enumerate(pool.heads):
        has_grad = all(p.grad is not None for p in head.parameters())
        assert has_grad == (i in heads), i
    opt.step()
    changed = {i for i, head in enumerate(pool.heads)
               for p, q in zip(head.parameters(), before[sum(len(list(h.parameters())) for h in pool.heads[:i]):])
               if not torch.equal(p, q)}
    assert changed == set(heads)


def test_refresh_reinitialises_about_one_percent_and_exactly_those(encoder):
    pool = make_pool(encoder, refresh_fraction=0.01)
    pool.cfg.refresh_fraction = 1.5 / len(pool)  # 1.5 heads on average: one or two every call
    opt = torch.optim.AdamW(pool.parameters(), lr=1e-2)
    # give every head optimizer state first
    for h in pool.heads:
        for p in h.parameters():
            p.grad = torch.ones_like(p)
    opt.step()
    before = [[p.detach().clone() for p in h.parameters()] for h in pool.heads]
    ids = pool.refresh(torch.Generator().manual_seed(7), opt)
    assert len(ids) in (1, 2)
    changed = [i for i, h in enumerate(pool.heads)
               if any(not torch.equal(p, q) for p, q in zip(h.parameters(), before[i]))]
    assert changed == ids
    for i in ids:
        assert all(p not in opt.state for p in pool.heads[i].parameters())  # Adam moments dropped too
    assert pool.refresh(torch.Generator().manual_seed(7), opt) == ids  # same seed, same heads (DDP ranks)
    assert make_pool(encoder, refresh_fraction=0.0).refresh(torch.Generator(), opt) == []


def test_refresh_count_averages_the_fraction_of_the_pool_below_one_head(encoder):
    """A fraction under one head per call still refreshes that share on average (not one head every call)."""
    gen = torch.Generator().manual_seed(0)
    for share in (0.3, 0.05):
        pool = make_pool(encoder, refresh_fraction=share / 100)
        pool.cfg.refresh_fraction = share / len(pool)  # `share` heads per call on average
        counts = [len(pool.refresh(gen)) for _ in range(2000)]
        assert set(counts) <= {0, 1}
        assert sum(counts) / len(counts) == pytest.approx(share, abs=0.03), share


def test_global_heads_see_whole_image_local_heads_see_crops(encoder):
    pool = make_pool(encoder)
    heads = pool.sample(10, torch.Generator().manual_seed(0))
    feats = features(encoder, pool, heads)
    assert set(feats) == set(TASKS)
    assert feats["global_cond"][0].shape[-1] == LATENT
    assert feats["local_cond"][0].shape[-1] == LATENT // 2 == feats["local_uncond"][0].shape[-1]
    # conditional and unconditional local views differ only by the prompt (same crops, same noise)
    assert torch.equal(feats["local_cond"][0], feats["local_uncond"][0])  # conv_in: before any cross-attention
    assert not torch.equal(feats["local_cond"][-1], feats["local_uncond"][-1])
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    crops = random_crops(x, 0.5, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 1, 4, 4)
    for b in range(2):  # each crop is a contiguous window of its own image
        flat = x[b].flatten().tolist()
        assert crops[b, 0, 0, 0].item() in flat and crops[b, 0, 0, 1] - crops[b, 0, 0, 0] == 1


def test_ablation_switches(encoder):
    single = make_pool(encoder, single_head=True)
    assert len(single) == 1 and all(single.sample(t, torch.Generator()) == [0] for t in (10, 250, 500, 750))
    glob = make_pool(encoder, tasks=("global_cond",))
    assert glob.tasks_of(glob.sample(250, torch.Generator())) == {"global_cond"}
    cond = make_pool(encoder, tasks=("global_cond", "local_cond"))
    assert "local_uncond" not in cond.tasks_of(cond.sample(250, torch.Generator()))
    feats = features(encoder, glob, glob.sample(250, torch.Generator()))
    assert set(feats) == {"global_cond"}  # no encoder pass is spent on crops nobody reads


def test_levels_keep_heads_only_at_the_named_encoder_levels(encoder):
    pool = make_pool(encoder, levels=(1, 4), tasks=("global_cond",))
    assert len(pool) == 4 * 2 * 1 * 3  # t* x the two named levels x one task x replicas
    assert {pool.slot_of(h)[1] for h in pool.sample(10, torch.Generator())} == {1, 4}
    feats = features(encoder, pool, pool.sample(10, torch.Generator()))
    assert set(pool(feats, pool.sample(10, torch.Generator()))) == set(pool.sample(10, torch.Generator()))
    assert pool.deepest(pool.sample(10, torch.Generator())) == 4
    pool02 = make_pool(encoder, levels=(0, 2))
    assert pool02.deepest(list(range(len(pool02)))) == 2  # the encoder may stop after level 2
    with pytest.raises(ValueError, match="5 feature levels"):  # a CLI message, not an IndexError mid-training
        make_pool(encoder, levels=(5,))
    with pytest.raises(ValueError, match="distinct"):
        PoolConfig(levels=(1, 1))


def test_encoder_stops_after_the_deepest_level_read_and_reuses_the_prompt_free_levels(encoder):
    """Stage 3's encoder runs only as deep as its heads read, and the matching-aware pool's second look at the reals
    (another prompt) takes the levels before the first cross-attention block from the first look. Both must give
    exactly the features of the full run under that prompt."""
    torch.manual_seed(0)
    x, t = torch.randn(3, 4, LATENT, LATENT), torch.full((3,), 250)
    a, b = (Conditioning(torch.randn(3, CTX_LEN, CTX_DIM)) for _ in range(2))
    with torch.no_grad():
        full_a, full_b = encoder(x, t, a), encoder(x, t, b)
        # conv_in | block 1: resnet, downsampler | block 2 (cross-attention): resnet | mid block
        lengths = []
        for upto in range(len(full_a)):
            part = encoder(x, t, a, upto)
            lengths.append(len(part))
            assert all(torch.equal(f, g) for f, g in zip(part, full_a))
        assert lengths == [1, 3, 3, 4, 5]  # whole blocks: a block's levels come together
        assert encoder.prompt_free_blocks == 1
        reused = encoder(x, t, b, reuse=full_a)
        assert all(f is g for f, g in zip(reused[:3], full_a[:3]))  # taken, not recomputed
        assert len(reused) == len(full_b) and all(torch.equal(f, g) for f, g in zip(reused, full_b))
        assert not torch.allclose(full_a[3], full_b[3])  # past the prefix the prompt matters: reuse stops in time
        assert len(encoder(x, t, b, upto=3, reuse=full_a)) == 4


def test_generator_gradient_flows_through_frozen_encoder_to_the_fake(encoder):
    pool = make_pool(encoder)
    heads = pool.sample(750, torch.Generator().manual_seed(0))
    fake = torch.randn(2, 4, LATENT, LATENT, requires_grad=True)
    for kind in ("softplus", "hinge"):
        fake.grad = None
        g_loss(pool(features(encoder, pool, heads, x0=fake), heads), kind).backward()
        assert fake.grad is not None and fake.grad.abs().sum() > 0
    real = {0: torch.full((2, 1, 1, 1), 5.0)}
    fake_l = {0: torch.full((2, 1, 1, 1), -5.0)}
    assert d_loss(real, fake_l, "hinge").item() == 0.0  # both margins met
    assert d_loss(real, fake_l, "softplus").item() < 0.02


def test_a_head_on_a_small_map_learns_a_level_difference():
    """Real and fake feature maps that differ only in their per-channel level: a head must tell them apart.
    (With a one-channel GroupNorm on these 2x2 maps it could not, and the shapes pool sat at 2 ln 2.)"""
    from trainer.discriminator import Head, d_loss

    torch.manual_seed(0)
    head = Head(in_ch=8, side=4, width=16, min_map=2)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(1)
    for _ in range(80):
        real = torch.randn((32, 8, 4, 4), generator=gen) + 0.5
        fake = torch.randn((32, 8, 4, 4), generator=gen)
        loss = d_loss({0: head(real)}, {0: head(fake)}, "softplus")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0  # chance is 2 ln 2 = 1.386


def test_a_head_without_norm_learns_an_image_wide_scale_difference_the_groupnorm_head_is_slow_to():
    """nitro.pool.head_norm: reals and fakes that differ only in the image-wide scale of their features. The
    GroupNorm head (one group on maps under 16 px: a per-image layer norm) mostly normalises it away; a head without
    the norm separates them within the same 150 updates. A bad value is a config error."""
    from trainer.discriminator import Head

    losses = {}
    for norm in ("group", "none"):
        torch.manual_seed(0)
        head = Head(in_ch=8, side=16, width=16, min_map=2, norm=norm)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, betas=(0.0, 0.99))
        gen = torch.Generator().manual_seed(1)
        for _ in range(150):
            real = torch.randn((32, 8, 16, 16), generator=gen) * 1.3
            fake = torch.randn((32, 8, 16, 16), generator=gen)
            loss = d_loss({0: head(real)}, {0: head(fake)}, "softplus")
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[norm] = loss.item()
    assert losses["none"] < 0.2 and losses["group"] > 0.5, losses
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in Head(8, 16, 16, 2, "none").modules())
    with pytest.raises(ValueError, match="head_norm"):
        PoolConfig(head_norm="batch")


def test_a_stats_head_learns_a_per_channel_shift_and_only_its_own_updates_move_its_running_statistics():
    """nitro.pool.head_kind=stats: reals whose channel 3 sits 0.5 higher than the fakes', under pixel noise of std 1
    (the best possible AUC on 8x8 maps is 0.998). Within 150 updates the stats head gives one verdict per image and
    separates fresh rows; its running statistics move on the heads' updates (learn=True) and never on the
    generator's look, and a refresh re-draws its weights but keeps them."""
    from trainer.discriminator import HeadPool, StatsHead

    torch.manual_seed(0)
    head = StatsHead(in_ch=8, width=16)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, betas=(0.0, 0.99))
    gen = torch.Generator().manual_seed(1)
    shift = torch.zeros(1, 8, 1, 1)
    shift[:, 3] = 0.5

    def batch():
        return torch.randn((32, 8, 8, 8), generator=gen) + shift, torch.randn((32, 8, 8, 8), generator=gen)

    for _ in range(150):
        real, fake = batch()
        loss = d_loss({0: head(real, learn=True)}, {0: head(fake, learn=True)}, "softplus")
        opt.zero_grad()
        loss.backward()
        opt.step()
    real, fake = batch()
    before = (head.mean.clone(), head.var.clone(), head.seen.item())
    r, f = head(real), head(fake)
    assert r.shape == (32, 1, 1, 1)
    assert (r.flatten()[:, None] > f.flatten()[None]).float().mean() > 0.95  # AUC on fresh rows
    assert torch.equal(head.mean, before[0]) and torch.equal(head.var, before[1]) and head.seen.item() == 300
    assert head.mean[3] == pytest.approx(0.25, abs=0.05)  # real and fake rows together: halfway

    pool = HeadPool(PoolConfig(timesteps=(10,), tasks=("global_cond",), head_kind="stats"), [(8, 8)])
    pool({"global_cond": [real]}, [0], learn=True)
    seen, weight = pool.heads[0].mean.clone(), pool.heads[0].net[0].weight.clone()
    pool.heads[0].reinit(torch.Generator().manual_seed(5))
    assert torch.equal(pool.heads[0].mean, seen) and not torch.equal(pool.heads[0].net[0].weight, weight)
    with pytest.raises(ValueError, match="head_kind"):
        PoolConfig(head_kind="mlp")


def test_head_losses_sum_or_average_and_accuracy_counts_the_right_side_of_zero():
    """nitro.pool.reduce: "sum" is the heads' count times "mean" (the generator's adversarial term grows with the
    subset); the heads' accuracy is the share of real logits > 0 and of fake logits < 0, each head weighing the same."""
    from trainer.discriminator import head_accuracy

    gen = torch.Generator().manual_seed(0)
    real = {i: torch.randn((4, 1, 2, 2), generator=gen) for i in range(3)}
    fake = {i: torch.randn((4, 1, 2, 2), generator=gen) for i in range(3)}
    for kind in ("softplus", "hinge"):
        assert g_loss(fake, kind, "sum").item() == pytest.approx(3 * g_loss(fake, kind).item(), rel=1e-6)
        assert d_loss(real, fake, kind, "sum").item() == pytest.approx(3 * d_loss(real, fake, kind).item(), rel=1e-6)
    ones = {0: torch.ones((2, 1, 2, 2)), 1: -torch.ones((2, 1, 1, 1))}  # one head right everywhere, one wrong
    assert head_accuracy(ones, {0: -torch.ones((2, 1, 2, 2)), 1: -torch.ones((2, 1, 1, 1))}) == (0.5, 1.0)


def test_min_snr_weighting_leaves_noisy_rows_alone_and_scales_clean_ones_down():
    """teacher.min_snr_gamma: a row whose SNR is under gamma keeps its epsilon MSE, one above it is scaled by
    gamma / SNR; gamma 0 is the plain MSE."""
    from trainer.models import alphas_cumprod
    from trainer.stage1 import epsilon_loss

    abar = alphas_cumprod()
    gen = torch.Generator().manual_seed(0)
    eps, noise = torch.randn((2, 4, 3, 3), generator=gen), torch.randn((2, 4, 3, 3), generator=gen)
    t = torch.tensor([10, 900])  # SNR ~ 1e2 and ~ 1e-2
    mse = (eps - noise).square().mean(dim=(1, 2, 3))
    assert epsilon_loss(eps, noise, t, abar).item() == pytest.approx(mse.mean().item(), rel=1e-6)
    snr = abar[10] / (1 - abar[10])
    expected = (mse[0] * 5 / snr + mse[1]) / 2
    assert epsilon_loss(eps, noise, t, abar, 5.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_small_patterned_weight_shifts_the_teachers_pool_draws_and_weight_1_keeps_them():
    """teacher.small_patterned_weight w: pool images of small striped / checkered objects are drawn w times as often
    as the rest (about a third of the pool, so at w = 2 half the draws); w = 1 draws exactly what
    `torch.randint` drew before the option."""
    from trainer.config import apply_overrides, recipe
    from trainer.shapes import ShapesDataset
    from trainer.stage1 import POOL_OFFSET, draw_pool, pool_draw_weights, small_patterned

    data, n = ShapesDataset(64, 0, "train", 0.1), 3000
    hard = small_patterned(data, n)
    a = data.attributes(POOL_OFFSET + int(hard.nonzero()[0]))[0]
    assert a.size == "small" and a.fill in ("striped", "checkered")
    assert hard.float().mean().item() == pytest.approx(1 / 3, abs=0.03)
    assert pool_draw_weights(data, n, 1.0) is None
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(draw_pool(n, 64, None, g1), torch.randint(n, (64,), generator=g2))
    share = hard.float().mean().item()
    for w in (2.0, 0.5):
        picks = draw_pool(n, 20000, pool_draw_weights(data, n, w), torch.Generator().manual_seed(1))
        assert hard[picks].float().mean().item() == pytest.approx(w * share / (w * share + 1 - share), abs=0.015)
    assert recipe("shapes16").teacher.small_patterned_weight == 1
    with pytest.raises(ValueError, match="small_patterned_weight"):
        apply_overrides(recipe("tiny"), ["teacher.small_patterned_weight=0"])
    with pytest.raises(ValueError, match="latent_pool"):
        apply_overrides(recipe("tiny"), ["teacher.small_patterned_weight=2", "teacher.latent_pool=0"])


def test_mismatch_term_shares_the_fake_side_so_calling_everything_fake_does_not_pay():
    """nitro.pool.mismatch: a conditional head's fake side is (fake + w x mismatched) / (1 + w). A head with one
    constant logit then does best at 0 (chance), as without the term; added instead of shared, the constant
    optimum moves to the fake side (measured: the heads called every input fake)."""
    def loss(c, w):
        x = torch.full((2, 1, 2, 2), float(c))
        return d_loss({0: x}, {0: x}, "softplus", mismatched={0: x}, mismatch=w).item()

    for w in (0.5, 1.0, 2.0):
        assert loss(0.0, w) == pytest.approx(2 * math.log(2))
        assert loss(0.0, w) < loss(-0.3, w) and loss(0.0, w) < loss(0.3, w)
    plain = d_loss({0: torch.ones(2, 1, 2, 2)}, {0: -torch.ones(2, 1, 2, 2)}, "softplus").item()
    assert d_loss({0: torch.ones(2, 1, 2, 2)}, {0: -torch.ones(2, 1, 2, 2)}, "softplus",
                  mismatched={0: -torch.ones(2, 1, 2, 2)}, mismatch=1.0).item() == pytest.approx(plain)


def test_cache_small_patterned_weight_shifts_the_cache_draws_and_weight_1_keeps_them(tmp_path):
    """cache.small_patterned_weight w: the init's and stage 3's cached pairs whose prompt names a small striped or
    checkered object are drawn w times as often as the rest; w = 1 draws what `torch.randint` drew before the
    option; a cache with no such prompt is an error, not a silent uniform draw."""
    import json

    from trainer.cache import INDEX, PairCache, cache_batch, chunk_path
    from trainer.config import apply_overrides, recipe
    from trainer.shapes import ShapesDataset, small_patterned_prompt

    data, n, size = ShapesDataset(64, 0, "train", 0.1), 600, 64
    prompts = data.prompts(range(n))
    truth = torch.tensor([data.attributes(i)[0].small_patterned for i in range(n)])
    assert [small_patterned_prompt(p) for p in prompts] == truth.tolist() and 0.25 < truth.float().mean() < 0.42
    for c in range(0, n, size):  # the cache's format: the row number in its noise, so a draw can be read back
        rows = torch.arange(c, min(c + size, n)).float()
        noise = rows.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
        torch.save({"noise": noise, "x0": torch.zeros_like(noise), "prompts": prompts[c:c + size]},
                   chunk_path(tmp_path, c // size))
    (tmp_path / INDEX).write_text(json.dumps({"pairs": n, "chunk_size": size}))

    plain = cache_batch(PairCache(tmp_path), torch.Generator().manual_seed(0), 32)
    rows = plain.noise[:, 0, 0, 0].long().tolist()
    assert rows == torch.randint(0, n, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    assert plain.prompts == [prompts[i] for i in rows]
    share = truth.float().mean().item()
    for w in (2.0, 0.5):
        pairs = cache_batch(PairCache(tmp_path, small_patterned_weight=w), torch.Generator().manual_seed(1), 20000)
        drawn = truth[pairs.noise[:, 0, 0, 0].long()].float().mean().item()
        assert drawn == pytest.approx(w * share / (w * share + 1 - share), abs=0.015)
    solid = tmp_path / "solid"
    solid.mkdir()
    torch.save({"noise": torch.zeros(2, 1, 2, 2), "x0": torch.zeros(2, 1, 2, 2),
                "prompts": ["large red circle on the left, blue background", "a photo of a cat"]}, chunk_path(solid, 0))
    (solid / INDEX).write_text(json.dumps({"pairs": 2, "chunk_size": 2}))
    with pytest.raises(ValueError, match="no prompt .* names a small striped or checkered object"):
        PairCache(solid, small_patterned_weight=2)
    assert recipe("shapes16").cache.small_patterned_weight == 1
    with pytest.raises(ValueError, match="cache.small_patterned_weight"):
        apply_overrides(recipe("tiny"), ["cache.small_patterned_weight=0"])
