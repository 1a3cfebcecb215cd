"""Omniglot from the official zips and folders, the two protocols (Vinyals; Lake et al.'s
small background sets + the 20 one-shot runs), and, when the real data is present, the
published counts, labels and raw-pixel 1-NN baseline of the 20 runs."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from episodes import build_split, load_cache, load_manifest, prepare_dataset
from episodes.datasets.omniglot import LAKE_RUNS_MANIFEST
from episodes.datasets.omniglot_runs import LakeRunsEpisodes
from tests.conftest import write_omniglot

REPO = Path(__file__).resolve().parents[1]


REAL_OMNIGLOT = Path(
    os.environ.get("FEWSHOT_NSL_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot")
)


def real_omniglot() -> Path | None:
    """The real small sets: $FEWSHOT_NSL_OMNIGLOT, else ``<repo>/../shared/data/omniglot``."""
    return REAL_OMNIGLOT if (REAL_OMNIGLOT / "all_runs.zip").is_file() else None


def zip_folder(folder: Path, archive: Path, top: bool = True) -> Path:
    """Zip ``folder`` as the official archives are (``<folder name>/...`` members)."""
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder.parent if top else folder).as_posix()
            handle.write(path, relative + ("/" if path.is_dir() else ""))
    return archive


def write_runs(root: Path, seed: int = 0, runs: int = 20) -> Path:
    """Fake ``all_runs/``: each run's test item ``k`` is a noisy copy of the training image of
    class ``perm[k]``, and class_labels.txt says so (test image first, as published)."""
    rng = np.random.default_rng(seed)
    for run in range(1, runs + 1):
        folder = root / f"run{run:02d}"
        (folder / "training").mkdir(parents=True)
        (folder / "test").mkdir()
        perm = rng.permutation(20)
        lines = []
        glyphs = rng.random((20, 105, 105)) > 0.5
        for m in range(20):
            Image.fromarray(glyphs[m]).convert("1").save(folder / f"training/class{m + 1:02d}.png")
        for k in range(20):
            noisy = glyphs[perm[k]] ^ (rng.random((105, 105)) > 0.97)
            Image.fromarray(noisy).convert("1").save(folder / f"test/item{k + 1:02d}.png")
            test_file = f"run{run:02d}/test/item{k + 1:02d}.png"
            lines.append(f"{test_file} run{run:02d}/training/class{perm[k] + 1:02d}.png")
        (folder / "class_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def write_small_sets(root: Path) -> Path:
    """Fake small1/small2: alphabet Greek in both (same files), others in one."""
    shared = {f"Greek/character{i:02d}": 20 for i in range(1, 6)}
    write_omniglot(
        root,
        {
            "images_background_small1": {
                **shared,
                **{f"Alpha/character{i:02d}": 20 for i in range(1, 11)},
            }
        },
    )
    write_omniglot(
        root / "s2",
        {"images_background_small2": {f"Beta/character{i:02d}": 20 for i in range(1, 5)}},
    )
    shutil.move(root / "s2/images_background_small2", root / "images_background_small2")
    shutil.copytree(
        root / "images_background_small1/Greek", root / "images_background_small2/Greek"
    )
    return root


def test_zips_and_folders_give_the_same_cache(tmp_path):
    chars = {
        "images_background": {"Alpha/character01": 3, "Alpha/character02": 3, "Beta/c1": 3},
        "images_evaluation": {"Gamma/character01": 3, "Gamma/character02": 3},
    }
    folders = write_omniglot(tmp_path / "folders", chars)
    zips = tmp_path / "zips"
    zips.mkdir()
    for part in chars:
        zip_folder(folders / part, zips / f"{part}.zip")
    a = prepare_dataset("omniglot", folders, tmp_path / "a", strict=False)
    b = prepare_dataset("omniglot", zips, tmp_path / "b", strict=False)
    for split in ("train", "val", "test"):
        assert (a / f"{split}.npy").read_bytes() == (b / f"{split}.npy").read_bytes()
        assert load_cache(a, split).fingerprint == load_cache(b, split).fingerprint
    # One archive alone is a source too (here: background only, split in proportion).
    alone = build_split("omniglot", "train", root=zips / "images_background.zip", rotations=False)
    assert alone.class_names[0] == "Alpha/character01"


def test_lake_protocol_counts_shared_characters_once_and_holds_out_per_alphabet(tmp_path):
    source = write_small_sets(tmp_path / "src")
    write_runs(source / "all_runs")
    zip_folder(source / "images_background_small2", source / "images_background_small2.zip")
    shutil.rmtree(source / "images_background_small2")  # small2 only as a zip
    options = dict(protocol="lake", rotations=False, strict=False)
    train = build_split("omniglot", "train", root=source, **options)
    val = build_split("omniglot", "val", root=source, **options)
    # 5 Greek (once) + 10 Alpha + 4 Beta = 19; val = round(0.2 n) of each alphabet: 1 + 2 + 1.
    assert train.num_classes + val.num_classes == 19
    assert val.class_names == [
        "Alpha/character09",
        "Alpha/character10",
        "Beta/character04",
        "Greek/character05",
    ]
    assert not set(train.class_names) & set(val.class_names)
    with pytest.raises(ValueError, match="19 distinct characters, expected 242"):
        prepare_dataset("omniglot", source, tmp_path / "strict", protocol="lake")
    assert not (tmp_path / "strict").exists()
    small1 = build_split("omniglot", "train", root=source, background="small1", **options)
    assert not any(n.startswith("Beta") for n in small1.class_names)
    rotated = build_split("omniglot", "train", root=source, protocol="minimal", strict=False)
    assert rotated.num_classes == 4 * train.num_classes


def test_the_runs_replay_with_their_labels_from_a_cache_manifest(tmp_path):
    source = write_small_sets(tmp_path / "src")
    write_runs(source / "all_runs")
    cache = prepare_dataset("omniglot", source, tmp_path / "cache", protocol="lake", strict=False)
    test = load_cache(cache, "test")
    assert test.num_classes == 400 and test.class_names[21] == "run02/class02"
    runs = load_manifest(cache / LAKE_RUNS_MANIFEST, test, way=20, shot=1, query=1)
    assert len(runs) == 20
    direct = LakeRunsEpisodes(test)
    for index, episode in enumerate(runs):
        again = direct[index]
        assert np.array_equal(episode.query_x.numpy(), again.query_x.numpy())
        # Each query is the noisy copy of its labelled class's training image: 1-NN is exact.
        dist = ((episode.query_x.flatten(1)[:, None] - episode.support_x.flatten(1)) ** 2).sum(-1)
        assert (episode.support_y[dist.argmin(1)] == episode.query_y).all()
    # A labels file that gives two test images the same class is refused, naming the file.
    labels = source / "all_runs/run01/class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " " + lines[0].split()[1]
    labels.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="class of two test images"):
        build_split("omniglot", "test", root=source, protocol="lake", strict=False)


def test_missing_runs_and_unknown_protocols_are_named(tmp_path):
    source = write_small_sets(tmp_path / "src")
    with pytest.raises(FileNotFoundError, match="no all_runs.zip"):
        build_split("omniglot", "test", root=source, protocol="lake")
    with pytest.raises(ValueError, match="protocol must be"):
        build_split("omniglot", "train", root=source, protocol="lake2015")
    with pytest.raises(FileNotFoundError, match="images_evaluation.*pass protocol='lake'"):
        build_split("omniglot", "train", root=source)


# --------------------------------------------------------------------------- the real data

needs_real = pytest.mark.skipif(
    real_omniglot() is None,
    reason=f"real Omniglot not found at {REAL_OMNIGLOT} (set FEWSHOT_NSL_OMNIGLOT)",
)


@pytest.fixture(scope="module")
def lake_cache(tmp_path_factory) -> Path:
    return prepare_dataset(
        "omniglot",
        real_omniglot(),
        tmp_path_factory.mktemp("lake") / "cache",
        protocol="lake",
        rotations=False,
    )


@needs_real
def test_real_small_sets_hold_136_and_156_characters_242_distinct(lake_cache):
    source = real_omniglot()
    sizes = {}
    for which in ("small1", "small2"):
        options = dict(protocol="lake", background=which, rotations=False)
        splits = [build_split("omniglot", s, root=source, **options) for s in ("train", "val")]
        assert all((s.class_counts == 20).all() for s in splits)
        sizes[which] = sum(s.num_classes for s in splits)
    assert sizes == {"small1": 136, "small2": 156}
    both = [load_cache(lake_cache, s) for s in ("train", "val")]
    assert sum(s.num_classes for s in both) == 242
    assert all((s.class_counts == 20).all() for s in both)


def _published_runs(archive: Path, size: int = 28) -> list[tuple[np.ndarray, np.ndarray, list]]:
    """Independent reading of all_runs.zip, as demo_classification.py does: sorted training
    and test files, the answer of test file i is the training file on its line."""
    out = []
    with zipfile.ZipFile(archive) as handle:

        def load(name: str) -> np.ndarray:
            with Image.open(io.BytesIO(handle.read(name))) as image:
                small = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(small, dtype=np.float64).ravel()

        for run in range(1, 21):
            pairs = [
                line.split()
                for line in handle.read(f"run{run:02d}/class_labels.txt").decode().splitlines()
                if line
            ]
            answers = dict(pairs)
            tests, trains = sorted(answers), sorted(set(answers.values()))
            out.append(
                (
                    np.stack([load(t) for t in trains]),
                    np.stack([load(t) for t in tests]),
                    [trains.index(answers[t]) for t in tests],
                )
            )
    return out


@needs_real
def test_real_runs_replay_the_published_labels_and_the_pixel_baseline(lake_cache):
    test = load_cache(lake_cache, "test")
    runs = load_manifest(lake_cache / LAKE_RUNS_MANIFEST, test, way=20, shot=1, query=1)
    published = _published_runs(real_omniglot() / "all_runs.zip")
    errors = []
    for episode, (train, tests, answers) in zip(runs, published):
        support = test.images[episode.support_indices.numpy()].reshape(20, -1).astype(np.float64)
        query = test.images[episode.query_indices.numpy()].reshape(20, -1).astype(np.float64)
        # Same images as the published run: each query is one test item, labelled as the
        # labels file says (support row of its label == training image of its answer).
        assert np.array_equal(support, train)
        for q, label in zip(query, episode.query_y.tolist()):
            item = next(i for i, t in enumerate(tests) if np.array_equal(t, q))
            assert answers[item] == label
        dist = ((query[:, None] - support[None]) ** 2).sum(-1)
        errors.append(
            float(np.mean(episode.support_y.numpy()[dist.argmin(1)] != episode.query_y.numpy()))
        )
        # The same 1-NN on the independently read run gives the same error.
        ref = ((tests[:, None] - train[None]) ** 2).sum(-1).argmin(1)
        assert errors[-1] == float(np.mean(ref != np.asarray(answers)))
    # Raw-pixel 1-NN at 28×28: 77.25% mean error over the 20 runs (issue 17: 77.2%).
    assert abs(100 * np.mean(errors) - 77.25) < 1e-9
