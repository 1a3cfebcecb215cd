"""Episodes per second: the canonical cache + EpisodeSampler vs. a naive per-image Pillow loader.

Generates its own fake Mini-ImageNet-like data (default 20 classes × 600 images, 84×84×3),
converts it to the canonical cache with ``prepare_mini_imagenet`` and loads it into memory;
the baseline decodes each episode's images from JPEG files with Pillow (the same episodes,
so both do the same work). Single process, ``torch.set_num_threads(1)``. Both run side by side
in one process, so their ratio is meaningful on a shared machine; absolute numbers are not.

    python scripts/bench_episodes.py [--classes 20] [--images 600] [--episodes 300]
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
            start = time.process_time()
            episodes = EpisodeSampler(train, 5, shot, 15, seed=0, num_episodes=num_steps)
            report = train_protonet(episodes, test_episodes, in_channels=1, image_size=28)
            print(
                f"5-way {shot}-shot, ProtoNet Conv-4 (hidden 32): untrained "
                f"{report.untrained_accuracy:.3f}, after {num_steps} episodes "
                f"{report.test_accuracy:.3f} (train {report.train_accuracy_last:.3f}; "
                f"{time.process_time() - start:.0f} s CPU)"
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
    args = parser.parse_args()
    torch.set_num_threads(1)
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
        print("episodes per second of wall time, and per second of this process's CPU time")
        print("(one thread: CPU time approximates an idle core when the machine is shared)")
        header = f"{'setting':<22}{'cache (RAM)':>14}{'cache (mmap)':>14}{'Pillow JPEG':>14}"
        print(f"{header}{'ratio':>8}")
        normalize = Normalize(split.mean, split.std)
        jpeg_split_rows = args.jpeg_images
        for shot in (1, 5):
            rates, cpu_rates = [], []
            for data in (split, mapped):
                sampler = EpisodeSampler(data, way=5, shot=shot, query=15, seed=0)
                for i in range(10):  # warm-up (page cache, allocator)
                    sampler[i]
                start, cpu_start = time.perf_counter(), time.process_time()
                for i in range(args.episodes):
                    sampler[i]
                rates.append(args.episodes / (time.perf_counter() - start))
                cpu_rates.append(args.episodes / (time.process_time() - cpu_start))
            # Baseline: the same kind of episode, images restricted to those written as JPEG.
            sampler = EpisodeSampler(split, way=5, shot=shot, query=15, seed=0)
            start, cpu_start = time.perf_counter(), time.process_time()
            for i in range(args.baseline_episodes):
                classes, support, query, _, _ = sampler.indices(i)
                rows = np.concatenate([support, query])
                within_class = (rows - split.labels[rows] * args.images) % jpeg_split_rows
                naive_episode(folder / "jpeg", split.class_names, split.labels[rows],
                              within_class, normalize)  # fmt: skip
            baseline = args.baseline_episodes / (time.perf_counter() - start)
            cpu_baseline = args.baseline_episodes / (time.process_time() - cpu_start)
            for label, row, base in (("wall", rates, baseline), ("cpu", cpu_rates, cpu_baseline)):
                setting = f"5-way {shot}-shot {label}"
                print(
                    f"{setting:<22}{row[0]:>12.0f}/s{row[1]:>12.0f}/s{base:>12.0f}/s"
                    f"{row[0] / base:>7.1f}x"
                )


if __name__ == "__main__":
    main()
