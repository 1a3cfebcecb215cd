"""The episode sampler, task batches, DataLoader use, manifests and transforms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from episodes import (
    Episode,
    EpisodeSampler,
    TaskBatcher,
    collate_episodes,
    load_manifest,
    save_manifest,
    transforms,
)


def assert_same_episode(a: Episode, b: Episode) -> None:
    for name in (
        "support_x", "support_y", "query_x", "query_y", "classes", "support_indices",
        "query_indices",
    ):  # fmt: skip
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.way, a.shot, a.query) == (b.way, b.shot, b.query)


# --------------------------------------------------------------------------- one episode


def test_episode_contents_match_the_split(glyph_split):
    sampler = EpisodeSampler(glyph_split, way=5, shot=2, query=3, seed=7, num_episodes=20)
    assert len(sampler) == 20
    mean, std = glyph_split.mean[0], glyph_split.std[0]
    for episode in sampler:
        assert episode.support_x.shape == (10, 1, 28, 28) and episode.query_x.shape == (
            15,
            1,
            28,
            28,
        )
        assert episode.support_x.dtype == torch.float32
        assert episode.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert episode.query_y.tolist() == sum(([label] * 3 for label in range(5)), [])
        classes = episode.classes.numpy()
        assert len(set(classes.tolist())) == 5
        rows = np.concatenate([episode.support_indices.numpy(), episode.query_indices.numpy()])
        assert len(set(rows.tolist())) == len(rows)  # no image twice in one episode
        labels = torch.cat([episode.support_y, episode.query_y]).numpy()
        # Episode label l is dataset class classes[l], for every image.
        assert np.array_equal(glyph_split.labels[rows], classes[labels])
        # Pixels: uint8 / 255, normalised with the train mean/std (float64 reference).
        pixels = glyph_split.images[rows].astype(np.float64).transpose(0, 3, 1, 2) / 255.0
        images = torch.cat([episode.support_x, episode.query_x]).double().numpy()
        assert np.allclose(images, (pixels - mean) / std, atol=1e-5)


def test_label_order_is_random_and_classes_cover_the_split(glyph_split):
    sampler = EpisodeSampler(glyph_split, way=3, shot=1, query=1, seed=0, num_episodes=200)
    firsts = [sampler.indices(i)[0] for i in range(200)]
    assert any(not np.all(np.diff(c) > 0) for c in firsts)  # not sorted: random label order
    assert set(np.concatenate(firsts).tolist()) == set(range(glyph_split.num_classes))


def test_episode_is_a_pure_function_of_seed_split_and_index(glyph_split, glyph_split_rgb):
    sampler = EpisodeSampler(glyph_split, way=4, shot=1, query=2, seed=3)
    again = EpisodeSampler(glyph_split, way=4, shot=1, query=2, seed=3)
    forward = [sampler[i] for i in range(6)]
    backward = [again[i] for i in reversed(range(6))][::-1]  # any access order
    for a, b in zip(forward, backward):
        assert_same_episode(a, b)
    other_seed = EpisodeSampler(glyph_split, way=4, shot=1, query=2, seed=4)
    assert not torch.equal(other_seed[0].support_indices, forward[0].support_indices)
    assert not torch.equal(forward[0].support_indices, forward[1].support_indices)
    with pytest.raises(IndexError):
        sampler[-1]


# --------------------------------------------------------------------------- bad settings


def test_way_larger_than_the_number_of_classes(glyph_split):
    with pytest.raises(ValueError, match="way=13 is larger than the 12 classes of synthetic/train"):
        EpisodeSampler(glyph_split, way=13, shot=1, query=1, seed=0)
    with pytest.raises(ValueError, match="way=20 is larger"):
        EpisodeSampler(glyph_split, way=(3, 20), shot=1, query=1, seed=0)


def test_class_with_fewer_images_than_shot_plus_query(glyph_split):
    with pytest.raises(
        ValueError, match="shot\\+query = 5\\+6 = 11 .* 12 class\\(es\\) have fewer"
    ):
        EpisodeSampler(glyph_split, way=5, shot=5, query=6, seed=0)
    # A callable shot is checked per episode, with the same message.
    sampler = EpisodeSampler(glyph_split, way=5, shot=lambda rng: 9, query=2, seed=0)
    with pytest.raises(ValueError, match="9\\+2 = 11"):
        sampler[0]


def test_invalid_arguments(glyph_split):
    for kwargs, message in (
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"query": -1}, "query must be a non-negative int"),
        ({"way": (4, 2)}, "way range .* is empty"),
        ({"way": "five"}, "way must be an int"),
        ({"shot": 0}, "shot must be >= 1"),
    ):
        settings = {"way": 3, "shot": 1, "query": 1, "seed": 0, **kwargs}
        with pytest.raises((ValueError, TypeError), match=message):
            EpisodeSampler(glyph_split, **settings)
    with pytest.raises(TypeError, match="unbounded"):
        len(EpisodeSampler(glyph_split, 3, 1, 1, seed=0))


def test_variable_way_and_shot(glyph_split):
    sampler = EpisodeSampler(glyph_split, way=(2, 5), shot=(1, 3), query=2, seed=1)
    drawn = set()
    for i in range(40):
        episode = sampler[i]
        drawn.add((episode.way, episode.shot))
        assert episode.support_x.shape[0] == episode.way * episode.shot
        assert episode.query_y.max() == episode.way - 1
        assert_same_episode(episode, sampler[i])
    assert {w for w, _ in drawn} == {2, 3, 4, 5} and {s for _, s in drawn} == {1, 2, 3}
    chooser = EpisodeSampler(
        glyph_split, way=lambda rng: int(rng.choice([2, 4])), shot=1, query=1, seed=0
    )
    assert {chooser[i].way for i in range(30)} == {2, 4}


# --------------------------------------------------------------------------- batching, loaders


def test_task_batches_are_consecutive_indices_and_ranks_share_them(glyph_split):
    sampler = EpisodeSampler(glyph_split, way=3, shot=1, query=1, seed=0, num_episodes=24)
    single = TaskBatcher(sampler, tasks_per_batch=4)
    assert len(single) == 6
    assert single.episode_indices(2) == [8, 9, 10, 11]
    ranks = [TaskBatcher(sampler, 4, rank=r, world_size=3) for r in range(3)]
    for step in range(6):
        shares = [batcher.episode_indices(step) for batcher in ranks]
        assert sorted(sum(shares, [])) == single.episode_indices(step)
        for rank, share in enumerate(shares):
            assert all(j % 3 == rank for j in (i - 4 * step for i in share))
    for a, b in zip(single.batch(5), [sampler[i] for i in range(20, 24)]):
        assert_same_episode(a, b)
    with pytest.raises(ValueError, match="rank"):
        TaskBatcher(sampler, 4, rank=3, world_size=3)


def test_resuming_from_a_step_gives_the_same_batches(glyph_split):
    sampler = EpisodeSampler(glyph_split, way=3, shot=2, query=2, seed=5)
    full = TaskBatcher(sampler, tasks_per_batch=2)
    first_run = [batch for _, batch in zip(range(5), full)]
    restarted = TaskBatcher(
        EpisodeSampler(glyph_split, way=3, shot=2, query=2, seed=5), 2, start_step=3
    )
    resumed = [batch for _, batch in zip(range(2), restarted)]
    for a, b in zip(first_run[3:], resumed):
        for x, y in zip(a, b):
            assert_same_episode(x, y)


def test_dataloader_workers_yield_identical_episodes(glyph_split):
    augment = transforms.Compose(
        [transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(0.5)]
    )
    sampler = EpisodeSampler(glyph_split, 4, 1, 2, seed=9, num_episodes=8, transform=augment)
    direct = [sampler[i] for i in range(8)]
    for workers in (0, 2):
        loader = DataLoader(sampler, batch_size=4, num_workers=workers, collate_fn=collate_episodes)
        batches = list(loader)
        assert [len(b) for b in batches] == [4, 4]
        for a, b in zip(direct, sum(batches, [])):
            assert_same_episode(a, b)
    batcher = TaskBatcher(sampler, tasks_per_batch=2)
    for workers in (0, 2):
        steps = list(batcher.loader(num_steps=3, start_step=1, num_workers=workers))
        for step, batch in zip(range(1, 4), steps):
            for a, b in zip(batch, batcher.batch(step)):
                assert_same_episode(a, b)


def test_collate_keeps_episodes_and_rejects_other_items(glyph_split):
    episode = EpisodeSampler(glyph_split, 2, 1, 1, seed=0)[0]
    assert collate_episodes([episode, episode]) == [episode, episode]
    assert collate_episodes(episode) == [episode]
    with pytest.raises(TypeError, match="expects Episode"):
        collate_episodes([episode, 3])


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_manifest_round_trip(glyph_split, tmp_path, suffix):
    sampler = EpisodeSampler(
        glyph_split, 5, 1, 4, seed=2, transform=transforms.RandomHorizontalFlip(0.5)
    )
    path = save_manifest(tmp_path / f"test{suffix}", sampler, num_episodes=12)
    replay = load_manifest(path, glyph_split, transform=transforms.RandomHorizontalFlip(0.5))
    assert len(replay) == 12 and (replay.way, replay.shot, replay.query) == (5, 1, 4)
    for i in range(12):
        assert_same_episode(replay[i], sampler[i])
    # From a list of episodes (variable way), with the split named explicitly.
    variable = EpisodeSampler(glyph_split, (2, 4), (1, 2), 2, seed=0)
    episodes = [variable[i] for i in range(6)]
    path = save_manifest(tmp_path / f"var{suffix}", episodes, 6, split=glyph_split)
    replay = load_manifest(path, glyph_split)
    ways = {e.way for e in episodes}
    assert replay.way == (ways.pop() if len(ways) == 1 else None)
    for original, replayed in zip(episodes, replay):
        assert torch.equal(original.support_indices, replayed.support_indices)
        assert torch.equal(original.query_x, replayed.query_x)  # default transform: normalise
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_manifest_checks_data_and_settings(glyph_split, glyph_split_rgb, tmp_path):
    sampler = EpisodeSampler(glyph_split, 5, 1, 2, seed=0)
    path = save_manifest(tmp_path / "m.json", sampler, 4)
    with pytest.raises(ValueError, match="way=5, but way=3 was asked"):
        load_manifest(path, glyph_split, way=3)
    with pytest.raises(ValueError, match="made for split 'train'.*'val'"):
        load_manifest(path, glyph_split_rgb)
    header = json.loads(path.read_text())
    header["fingerprint"] = "0" * 32
    path.write_text(json.dumps(header))
    with pytest.raises(ValueError, match="fingerprint .* does not match"):
        load_manifest(path, glyph_split)
    header = json.loads(save_manifest(tmp_path / "n.json", sampler, 4).read_text())
    header["episodes"][1]["support"][0] = header["episodes"][1]["query"][0] + 0
    header["episodes"][1]["classes"][0] = (header["episodes"][1]["classes"][0] + 1) % 12
    (tmp_path / "n.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="episode 1 rows do not belong to its stored classes"):
        load_manifest(tmp_path / "n.json", glyph_split)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.npz is not a readable episode manifest"):
        load_manifest(tmp_path / "bad.npz", glyph_split)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_manifest(tmp_path / "missing.json", glyph_split)
    with pytest.raises(ValueError, match="use a .json or .npz"):
        save_manifest(tmp_path / "m.txt", sampler, 4)


def test_default_test_set_size(glyph_split, tmp_path):
    sampler = EpisodeSampler(glyph_split, 5, 1, 5, seed=0)
    replay = load_manifest(save_manifest(tmp_path / "t.npz", sampler), glyph_split)
    assert len(replay) == 600


# --------------------------------------------------------------------------- transforms


def test_normalize_against_reference():
    images = torch.rand(4, 3, 5, 6)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    out = transforms.Normalize(mean, std)(images)
    reference = (images.double() - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(
        std
    ).double().view(1, 3, 1, 1)
    assert torch.allclose(out.double(), reference, atol=1e-6)
    with pytest.raises(ValueError, match="std must be non-zero"):
        transforms.Normalize((0.0,), (0.0,))


def test_random_crop_against_a_loop_reference():
    images = torch.rand(6, 2, 7, 9)
    crop = transforms.RandomCrop((5, 6), padding=2)
    out = crop(images, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)  # replay the same draws
    padded = torch.nn.functional.pad(images, [2, 2, 2, 2])
    top = torch.randint(0, 11 - 5 + 1, (6,), generator=generator)
    left = torch.randint(0, 13 - 6 + 1, (6,), generator=generator)
    for n in range(6):
        expected = padded[n, :, top[n] : top[n] + 5, left[n] : left[n] + 6]
        assert torch.equal(out[n], expected)
    assert len({(int(t), int(l)) for t, l in zip(top, left)}) > 1


def test_flip_and_jitter_are_seeded_and_per_image():
    images = torch.rand(64, 3, 4, 4)
    flip = transforms.RandomHorizontalFlip(0.5)
    out = flip(images, torch.Generator().manual_seed(1))
    flipped = [torch.equal(out[n], images[n].flip(-1)) for n in range(64)]
    kept = [torch.equal(out[n], images[n]) for n in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    assert torch.equal(out, flip(images, torch.Generator().manual_seed(1)))
    jitter = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)
    a = jitter(images, torch.Generator().manual_seed(2))
    assert torch.equal(a, jitter(images, torch.Generator().manual_seed(2)))
    assert not torch.equal(a, jitter(images, torch.Generator().manual_seed(3)))
    assert a.min() >= 0 and a.max() <= 1


def test_color_jitter_against_reference():
    images = torch.rand(3, 3, 4, 5)
    out = transforms.ColorJitter(brightness=0.5)(images, torch.Generator().manual_seed(4))
    factor = torch.rand(3, generator=torch.Generator().manual_seed(4)) * 1.0 + 0.5
    assert torch.allclose(out, (images * factor.view(3, 1, 1, 1)).clamp(0, 1))
    gray_images = torch.rand(2, 1, 4, 4)  # saturation leaves 1-channel images alone
    same = transforms.ColorJitter(saturation=0.9)(gray_images, torch.Generator().manual_seed(0))
    assert torch.equal(same, gray_images)
    contrast = transforms.ColorJitter(contrast=0.5)(images, torch.Generator().manual_seed(5))
    factor = torch.rand(3, generator=torch.Generator().manual_seed(5)) + 0.5
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    mean = (images * luma).sum(1, keepdim=True).mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(contrast, ((images - mean) * factor.view(3, 1, 1, 1) + mean).clamp(0, 1))


def test_resize_and_compose():
    images = torch.rand(2, 3, 8, 8)
    resized = transforms.Resize(4)(images)
    assert resized.shape == (2, 3, 4, 4)
    # Antialiased 2× bilinear shrink of a constant image stays constant.
    assert torch.allclose(transforms.Resize(4)(torch.full((1, 1, 8, 8), 0.3)), torch.tensor(0.3))
    pipeline = transforms.Compose(
        [transforms.Resize(6), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]
    )
    assert pipeline(images).shape == (2, 3, 6, 6)
    assert "Resize" in repr(pipeline) and "Normalize" in repr(pipeline)
    with pytest.raises(ValueError, match="expected a float batch"):
        transforms.Resize(4)(torch.zeros(3, 8, 8))


def test_sampler_passes_the_episode_generator_to_the_transform(glyph_split):
    seen = []

    def record(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        seen.append(torch.rand(1, generator=generator).item())
        return images

    sampler = EpisodeSampler(glyph_split, 2, 1, 1, seed=0, transform=record)
    sampler[0], sampler[1], sampler[0]
    assert seen[0] == seen[2] != seen[1]
    images = sampler[0].support_x  # no normalisation: [0, 1] pixels
    assert images.min() >= 0 and images.max() <= 1


def test_task_batcher_rejects_ranks_without_tasks(glyph_split):
    sampler = EpisodeSampler(glyph_split, 3, 1, 1, seed=0)
    with pytest.raises(ValueError, match="tasks_per_batch=2 < world_size=4"):
        TaskBatcher(sampler, 2, rank=0, world_size=4)
    with pytest.raises(TypeError, match="unbounded"):
        len(TaskBatcher(sampler, 2))


# --------------------------------------------------------------------------- the uint8 path


def assert_uint8_matches_float(raw: Episode, flt: Episode, mean, std) -> None:
    """The uint8 episode, converted, is the float episode (same draw, same pixels)."""
    assert raw.is_uint8 and not flt.is_uint8
    for name in ("support_y", "query_y", "classes", "support_indices", "query_indices"):
        assert torch.equal(getattr(raw, name), getattr(flt, name)), name
    converted = raw.to_float(mean, std)
    # Within float rounding of an independent float64 reference, and on CPU bit-identical.
    for side in ("support_x", "query_x"):
        pixels = getattr(raw, side).double().permute(0, 3, 1, 2) / 255.0
        reference = (pixels - torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)) / (
            torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        )
        torch.testing.assert_close(getattr(flt, side).double(), reference, rtol=0, atol=1e-5)
        assert torch.equal(getattr(converted, side), getattr(flt, side)), side


@pytest.mark.parametrize("fixture", ["glyph_split", "glyph_split_rgb"])
def test_uint8_output_is_the_same_episode_as_the_float_path(fixture, request, tmp_path):
    split = request.getfixturevalue(fixture)
    mean, std = split.normalization
    flt = EpisodeSampler(split, 3, (1, 2), 2, seed=4, num_episodes=6)
    raw = EpisodeSampler(split, 3, (1, 2), 2, seed=4, num_episodes=6, output="uint8")
    for index in range(6):
        assert raw[index].support_x.shape[1:] == split.images.shape[1:]  # (H, W, C) as stored
        assert_uint8_matches_float(raw[index], flt[index], mean, std)
    # DataLoader workers and ranks hand over the same uint8 episodes.
    for workers in (0, 2):
        loader = DataLoader(raw, batch_size=3, num_workers=workers, collate_fn=collate_episodes)
        for a, b in zip(sum(list(loader), []), [raw[i] for i in range(6)]):
            assert_same_episode(a, b)
    ranks = [TaskBatcher(raw, 2, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        merged = sorted(ranks[0].batch(step) + ranks[1].batch(step), key=lambda e: e.classes[0])
        single = sorted(TaskBatcher(flt, 2).batch(step), key=lambda e: e.classes[0])
        for a, b in zip(merged, single):
            assert_uint8_matches_float(a, b, mean, std)
    # A manifest replays the same uint8 episodes.
    save_manifest(tmp_path / "m.npz", flt, 6)
    replay = load_manifest(tmp_path / "m.npz", split, output="uint8")
    for index in range(6):
        assert_uint8_matches_float(replay[index], flt[index], mean, std)


def test_uint8_output_refuses_a_transform_and_pinning_without_cuda(glyph_split):
    with pytest.raises(ValueError, match="takes no transform"):
        EpisodeSampler(glyph_split, 2, 1, 1, seed=0, output="uint8", transform=transforms.Resize(8))
    with pytest.raises(ValueError, match="output must be one of"):
        EpisodeSampler(glyph_split, 2, 1, 1, seed=0, output="half")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            EpisodeSampler(glyph_split, 2, 1, 1, seed=0, output="uint8", pin_memory=True)


def test_to_float_normalized_checks_its_input():
    with pytest.raises(ValueError, match="expected uint8 \\(N, H, W, C\\)"):
        transforms.to_float_normalized(torch.zeros(2, 3, 4, 4), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="pixels have 3 channels, mean/std have 1/1"):
        transforms.to_float_normalized(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), (0.5,), (1,))


def test_unit_normalization_scales_to_0_1_and_keeps_the_data():
    from episodes import build_split

    plain = build_split("synthetic", "val", num_classes=4, images_per_class=4)
    unit = build_split("synthetic", "val", num_classes=4, images_per_class=4, normalize="unit")
    assert unit.fingerprint == plain.fingerprint and unit.normalization == ((0.0,), (1.0,))
    episode = EpisodeSampler(unit, 2, 1, 1, seed=0)[0]
    pixels = unit.images[episode.support_indices.numpy()].transpose(0, 3, 1, 2) / 255.0
    torch.testing.assert_close(episode.support_x.double(), torch.from_numpy(pixels))
    with pytest.raises(ValueError, match="normalize must be one of"):
        build_split("synthetic", "val", num_classes=4, images_per_class=4, normalize="minmax")


def test_unit_inverted_normalization_is_one_minus_pixel_over_255():
    """cbfinn/maml's Omniglot input: ``1.0 - image / 255`` (strokes 1, background 0)."""
    from episodes import build_split

    split = build_split(
        "synthetic", "val", num_classes=4, images_per_class=4, normalize="unit_inverted"
    )
    episode = EpisodeSampler(split, 2, 1, 1, seed=0)[0]
    pixels = 1.0 - split.images[episode.support_indices.numpy()].transpose(0, 3, 1, 2) / 255.0
    torch.testing.assert_close(episode.support_x.double(), torch.from_numpy(pixels))
    uint8 = EpisodeSampler(split, 2, 1, 1, seed=0, output="uint8")[0]
    as_float = transforms.to_float_normalized(uint8.support_x, *split.normalization)
    torch.testing.assert_close(as_float, episode.support_x, rtol=0, atol=0)
