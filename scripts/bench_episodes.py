"""Episodes per second: the canonical cache + EpisodeSampler vs. a naive per-image Pillow loader.

Generates its own fake Mini-ImageNet-like data (default 20 classes × 600 images, 84×84×3),
converts it to the canonical cache with ``prepare_mini_imagenet`` and reads it in memory and
memory-mapped, as float episodes (normalised on the host) and as uint8 episodes (raw pixels
for conversion on the training device: the path training and evaluation use), the latter
also with that conversion done on a CPU device (``uint8+cpu``); the baseline decodes each
episode's images from JPEG files with Pillow. Single process, ``torch.set_num_threads(1)``,
wall-clock time only. The variants are interleaved in rounds (order rotated) and compared as
the median [min-max] of per-round ratios. The 1-minute load average is printed before and
after; a run on a machine loaded beyond its core count is refused (``--allow-loaded`` runs
it, flagged).

    python scripts/bench_episodes.py [--classes 20] [--images 600] [--episodes 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchtools import load_guard, load_report, median_range
from PIL import Image

from episodes import EpisodeSampler, load_cache, prepare_mini_imagenet
from episodes.transforms import Normalize, uint8_to_float


def write_fake_source(folder: Path, classes: int, images: int, jpeg_images: int) -> Path:
    """Cache pickles for train (``classes`` × ``images``) and tiny val/test, plus JPEGs of the
    first ``jpeg_images`` images of every train class for the baseline."""
    rng = np.random.default_rng(0)
    # Smooth random images (8×8 blocks), so JPEG files have a realistic size.
    coarse = rng.integers(0, 256, size=(classes * images, 11, 11, 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(coarse, 8, 1), 8, 2)[:, :84, :84]
    wnids = [f"n{c:08d}" for c in range(classes)]
    class_dict = {w: list(range(c * images, (c + 1) * images)) for c, w in enumerate(wnids)}
    source = folder / "source"
    source.mkdir()
    with (source / "mini-imagenet-cache-train.pkl").open("wb") as handle:
        pickle.dump({"image_data": np.ascontiguousarray(pixels), "class_dict": class_dict}, handle)
    small = {"image_data": pixels[:40].copy(), "class_dict": {"n99999999": list(range(40))}}
    for split in ("val", "test"):
        with (source / f"mini-imagenet-cache-{split}.pkl").open("wb") as handle:
            pickle.dump(small, handle)
    jpegs = folder / "jpeg"
    for c, wnid in enumerate(wnids):
        (jpegs / wnid).mkdir(parents=True)
        for i in range(jpeg_images):
            Image.fromarray(pixels[c * images + i]).save(jpegs / wnid / f"{i}.jpg", quality=90)
    return source


def naive_episode(jpegs: Path, class_names, labels_of_rows, rows, normalize: Normalize):
    """The baseline: open, decode and convert every image of the episode with Pillow."""
    decoded = []
    for row, class_id in zip(rows, labels_of_rows):
        with Image.open(jpegs / class_names[class_id] / f"{row}.jpg") as image:
            decoded.append(np.asarray(image.convert("RGB")))
    return normalize(uint8_to_float(torch.from_numpy(np.stack(decoded))))


def learnability(steps: list[int]) -> None:
    """How hard is the synthetic dataset? Raw-pixel 1-NN and a Conv-4 ProtoNet trained for
    ``steps`` episodes (5-way 1-shot, 15 queries for evaluation on 200 test episodes)."""
    from diagnostics import nearest_neighbour_accuracy, train_protonet

    from episodes import build_split

    train = build_split("synthetic", "train")
    test = build_split("synthetic", "test")
    print(f"train: {train}\ntest: {test}")
    for shot in (1, 5):
        test_episodes = [EpisodeSampler(test, 5, shot, 15, seed=1)[i] for i in range(200)]
        print(
            f"5-way {shot}-shot, 1-NN raw pixels: {nearest_neighbour_accuracy(test_episodes):.3f}"
        )
        for num_steps in steps:
            start = time.perf_counter()
            episodes = EpisodeSampler(train, 5, shot, 15, seed=0, num_episodes=num_steps)
            report = train_protonet(episodes, test_episodes, in_channels=1, image_size=28)
            print(
                f"5-way {shot}-shot, ProtoNet Conv-4 (hidden 32): untrained "
                f"{report.untrained_accuracy:.3f}, after {num_steps} episodes "
                f"{report.test_accuracy:.3f} (train {report.train_accuracy_last:.3f}; "
                f"{time.perf_counter() - start:.0f} s wall)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--baseline-episodes", type=int, default=30)
    parser.add_argument("--jpeg-images", type=int, default=60, help="JPEGs per class (baseline)")
    parser.add_argument(
        "--learnability",
        type=int,
        nargs="*",
        help="instead: train a ProtoNet on the synthetic glyphs for these episode counts",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per setting")
    parser.add_argument(
        "--allow-loaded",
        action="store_true",
        help="run even when the 1-minute load exceeds the core count (figures flagged)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    load, cores = load_guard(args.allow_loaded)
    if args.learnability is not None:
        learnability(args.learnability or [300, 1000])
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        source = write_fake_source(folder, args.classes, args.images, args.jpeg_images)
        cache = prepare_mini_imagenet(source, folder / "cache", strict=False)
        split = load_cache(cache, "train", mmap=False)
        mapped = load_cache(cache, "train", mmap=True)
        print(f"setup (fake data, cache): {time.perf_counter() - start:.1f} s")
        print(f"machine: {platform.processor() or platform.machine()}, torch threads: 1")
        print(f"split: {split}")
        variants = {
            "RAM float": (split, "float"),
            "mmap float": (mapped, "float"),
            "RAM uint8": (split, "uint8"),
            "mmap uint8": (mapped, "uint8"),
            "RAM uint8+cpu": (split, "uint8"),  # + the trainer's conversion on a CPU device
        }
        normalize = Normalize(split.mean, split.std)
        print(
            f"wall-clock episodes/s, 5-way, 15 queries; {args.rounds} rounds of {args.episodes} "
            "episodes per variant, variants interleaved (order rotated each round); "
            "'uint8' = raw pixels handed over, converted later by the trainer (not timed); "
            "'uint8+cpu' = with that conversion on a CPU device (sampler.to_device)"
        )
        wall_start = time.perf_counter()
        for shot in (1, 5):
            samplers = {
                name: EpisodeSampler(data, way=5, shot=shot, query=15, seed=0, output=output)
                for name, (data, output) in variants.items()
            }
            for sampler in samplers.values():
                for i in range(10):  # warm-up (page cache, allocator)
                    sampler[i]
            rates: dict[str, list[float]] = {name: [] for name in [*samplers, "Pillow JPEG"]}
            names = list(rates)
            for round_index in range(args.rounds):
                first = 10 + round_index * args.episodes  # fresh episodes every round
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    if name == "Pillow JPEG":
                        sampler = samplers["RAM float"]
                        count = args.baseline_episodes
                        start = time.perf_counter()
                        for i in range(first, first + count):
                            _, support, query, _, _ = sampler.indices(i)
                            rows = np.concatenate([support, query])
                            within = (rows - split.labels[rows] * args.images) % args.jpeg_images
                            labels = split.labels[rows]
                            naive_episode(
                                folder / "jpeg", split.class_names, labels, within, normalize
                            )
                    elif name.endswith("+cpu"):
                        sampler, count = samplers[name], args.episodes
                        start = time.perf_counter()
                        for i in range(first, first + count):
                            sampler.to_device(sampler[i], "cpu")
                    else:
                        sampler, count = samplers[name], args.episodes
                        start = time.perf_counter()
                        for i in range(first, first + count):
                            sampler[i]
                    rates[name].append(count / (time.perf_counter() - start))
            print(f"\n5-way {shot}-shot: rate per variant, median [min-max] over rounds")
            for name, values in rates.items():
                print(f"  {name:<14} {median_range(values)} episodes/s")
            print("  paired ratios per round, median [min-max]:")
            for a, b in (
                ("RAM float", "Pillow JPEG"),
                ("RAM uint8", "RAM float"),
                ("RAM uint8+cpu", "RAM float"),
                ("mmap float", "RAM float"),
                ("mmap uint8", "RAM uint8"),
            ):
                ratios = [x / y for x, y in zip(rates[a], rates[b])]
                print(f"  {a} / {b}: {median_range(ratios)}")
        print(f"\nwall-clock time of the measurements: {time.perf_counter() - wall_start:.1f} s")
        load_report(load, cores)


if __name__ == "__main__":
    main()
