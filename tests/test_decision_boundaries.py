"""The paper's three decision rules at their exact boundary (Carlini et al. 2023).

Each test puts a case exactly on the threshold, with the distances worked out by hand, so that a
rule written with the other comparison (``>`` for ``≥``, ``<`` for ``≤``, ``≤`` for ``<``) fails:

1. detection: a prompt is flagged when its largest clique has **at least** k members (§4.1);
2. verification: a generation extracts a training image when their tiled ℓ2 is **at most** δ
   (Def. 1), and the k-eidetic count counts the training images **within** δ of it (Def. 2);
3. the calibrated distance of the unconditional study: extracted when ℓ is **strictly** below 1.

Hand-worked distances (pixels / 255, RMS over each tile's pixels and channels, max over tiles;
16×16 images, grid 4, so 4×4 tiles of 48 values):

* black vs white: every value differs by 255 → 1.0;
* black vs an image with one pixel (all channels) of 153 in every tile: sqrt(3·153² / 48) / 255 =
  153 / 1020 = 0.15 exactly, the paper's δ;
* black vs an image white on 4 of every tile's 16 pixels: sqrt(4/16) = 0.5, on 8 of 16:
  sqrt(1/2) ≈ 0.707; the two differ on 4 of 16 pixels → 0.5.

Distances are float32 and compared with δ in float32 (:mod:`memscan.distances`): the exact value
0.15 and δ = 0.15 round to the same float32, so the tie is a tie. The next threshold below 1.0 is
therefore float32's, ``nextafter(float32(1), 0)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from distance_support import products  # noqa: F401 - the fixture: int8 and float32 tile products
from PIL import Image

from memscan.data.training import TrainingSet
from memscan.extraction.calibrated import CalibratedConfig, calibrated_distance
from memscan.extraction.detect import detect, detect_many
from memscan.extraction.verify import verify_candidates
from memscan.extraction.verify_index import IndexVerification, IndexVerifier, verify_candidates_indexed
from memscan.index.faiss_index import build_index

S = 16  # image side; grid 4 → 4×4 tiles
BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))  # 1 − 2⁻²⁴, the float32 just below 1


def _black():
    return np.zeros((S, S, 3), np.uint8)


def _white():
    return np.full((S, S, 3), 255, np.uint8)


def _one_pixel_per_tile(value: int, base: np.ndarray) -> np.ndarray:
    """``base`` with the top-left pixel of every 4×4 tile set to ``value`` (all channels)."""
    out = base.copy()
    out[::4, ::4] = value
    return out


def _quarter_white():
    """White on pixels (even row, even column): 4 of every tile's 16 → tiled ℓ2 0.5 from black."""
    out = _black()
    out[::2, ::2] = 255
    return out


def _half_white():
    """:func:`_quarter_white` plus (odd row, odd column): 8 of 16 → sqrt(1/2) from black, 0.5
    from the quarter-white image (they differ on 4 of 16)."""
    out = _quarter_white()
    out[1::2, 1::2] = 255
    return out


# ---------------------------------------------------------------------------------------------
# 1. detection: clique size ≥ k


def _prompt(n_same: int, n_random: int, seed: int) -> np.ndarray:
    """``n_same`` identical generations (pairwise distance 0 < α) and ``n_random`` uniform-noise
    ones (≈0.29 from the grey copies and ≈0.41 from each other: far beyond α = 0.08)."""
    rng = np.random.default_rng(seed)
    same = np.repeat(np.full((1, S, S, 3), 128, np.uint8), n_same, axis=0)
    noise = rng.integers(0, 256, (n_random, S, S, 3), dtype=np.uint8)
    return np.concatenate([same, noise])


def test_a_clique_of_exactly_k_generations_is_detected():
    """Carlini et al. 2023 §4.1: a prompt is memorized when a clique of ≥ k near-identical
    generations exists. 10 identical generations and 2 noise ones: the largest clique has 10
    members, so k = 10 detects it (the tie) and k = 11 does not."""
    x = _prompt(10, 2, seed=0)
    at_k = detect(x, alpha=0.08, min_clique=10)
    assert at_k.clique.size == 10
    assert at_k.detected is True and at_k.row()["detected"] is True
    assert detect(x, alpha=0.08, min_clique=11).detected is False


def test_batched_detection_flags_a_clique_of_exactly_k():
    """The same rule (clique ≥ k) through :func:`detect_many`, the batched detection of
    ``extract``'s shards: prompts with cliques of 10 and 11; k = 10 flags both, k = 11 only the
    second, k = 12 neither — whether run on one thread or several."""
    batch = [_prompt(10, 2, seed=1), _prompt(11, 1, seed=2)]
    for threads in (1, 2):
        got = {k: [d.detected for d in detect_many(batch, alpha=0.08, min_clique=k, threads=threads)]
               for k in (10, 11, 12)}  # fmt: skip
        assert got == {10: [True, True], 11: [False, True], 12: [False, False]}, threads


class _TenCopies:
    """A generator for prompt ``p0`` of an ``extract`` run of 12 samples: samples 0–9 are one
    grey image (a clique of exactly 10), samples 10 and 11 uniform noise."""

    def __init__(self, seed: int = 0):
        from memscan.generators.seeds import derive_seed

        self.index = {derive_seed(seed, "p0", i): i for i in range(12)}

    def generate(self, prompt, seeds):
        out = []
        for s in seeds:
            i = self.index.get(s, 0)  # a shape probe with another seed: a grey image
            if i < 10:
                out.append(np.full((S, S, 3), 128, np.uint8))
            else:
                out.append(np.random.default_rng(i).integers(0, 256, (S, S, 3), dtype=np.uint8))
        return np.stack(out)


def test_reverification_flags_a_recorded_clique_of_exactly_k(tmp_path):
    """``memscan verify RUN --min-clique k`` re-decides detection from the recorded clique
    sizes with the same rule, clique ≥ k: a run whose only prompt has a clique of exactly 10
    (extracted at k = 2) re-verified at k = 10 still detects it; at k = 11 it does not."""
    from memscan.extraction.config import ExtractConfig
    from memscan.extraction.pipeline import extract, reverify

    train = tmp_path / "train"
    train.mkdir()
    Image.fromarray(np.full((S, S, 3), 128, np.uint8)).save(train / "grey.png")
    cfg = ExtractConfig(samples_per_prompt=12, batch_size=12, min_clique=2, shard_size=1)
    run = extract(_TenCopies(), ["copy"], train, tmp_path / "run", cfg, progress=False)
    assert int(run.detections["clique_size"].iloc[0]) == 10
    at_k = reverify(run.run_dir, train, min_clique=10)
    assert at_k.manifest["counts"]["detections"] == 1 and bool(at_k.detections["detected"].iloc[0])
    above = reverify(run.run_dir, train, min_clique=11)
    assert above.manifest["counts"]["detections"] == 0 and not bool(above.detections["detected"].iloc[0])


# ---------------------------------------------------------------------------------------------
# 2. verification: tiled ℓ2 ≤ δ


def _cands(names):
    return pd.DataFrame({"prompt_id": names, "train_id": [None] * len(names), "clique_size": [10] * len(names),
                         "mean_clique_distance": [0.0] * len(names)})  # fmt: skip


def _training(images: dict) -> TrainingSet:
    return TrainingSet(ids=list(images), captions=[""] * len(images), images=np.stack(list(images.values())))


#: candidates against a training set holding one white image: black is 1.0 from it, the exact
#: copy 0.0, white with one 102 pixel per tile (255 − 153) exactly 0.15
CANDIDATES = {"black": _black(), "copy": _white(), "dip": _one_pixel_per_tile(102, _white())}


def _decisions(table: pd.DataFrame) -> dict:
    top = table[table["rank"] == 1].set_index("prompt_id")
    return {p: (bool(top.loc[p, "extracted"]), int(top.loc[p, "eidetic_k"])) for p in top.index}


#: (δ, {candidate: (extracted, k-eidetic count)}), by hand: extracted iff the distance ≤ δ; the
#: white training image is within any δ ≥ 0 of itself, so an extraction counts k = 1
CASES = [
    (1.0, {"black": (True, 1), "copy": (True, 1), "dip": (True, 1)}),  # 1.0 ≤ 1.0: the tie
    (BELOW_ONE, {"black": (False, 0), "copy": (True, 1), "dip": (True, 1)}),
    (0.15, {"black": (False, 0), "copy": (True, 1), "dip": (True, 1)}),  # the paper's δ, tied
    (0.0, {"black": (False, 0), "copy": (True, 1), "dip": (False, 0)}),  # an exact copy at δ = 0
]


#: δ as a Python float, a NumPy float64 (from np.arange, a config read with NumPy) and float32
DELTA_TYPES = (float, np.float64, np.float32)


def test_hand_worked_distances():
    """The distances the verification tests rest on, from the library's own tiled ℓ2."""
    from memscan.distances import tiled_l2

    assert float(tiled_l2(_black(), _white())) == 1.0
    assert float(tiled_l2(_white(), _white())) == 0.0
    assert tiled_l2(CANDIDATES["dip"], _white()) == np.float32(0.15)
    assert tiled_l2(_black(), _one_pixel_per_tile(153, _black())) == np.float32(0.15)
    assert float(tiled_l2(_black(), _quarter_white())) == 0.5
    assert float(tiled_l2(_quarter_white(), _half_white())) == 0.5
    assert tiled_l2(_black(), _half_white()) == np.float32(np.sqrt(0.5))


@pytest.mark.usefixtures("products")
@pytest.mark.parametrize(("delta", "want"), CASES, ids=["tie-1.0", "below-1.0", "tie-0.15", "copy-at-0"])
def test_verification_extracts_at_distance_equal_to_delta(delta, want):
    """Carlini et al. 2023 Def. 1: x̂ extracts x when tiled ℓ2(x̂, x) ≤ δ — a distance equal to δ
    extracts (black vs white = 1.0 at δ = 1.0; 0.15 at the paper's δ = 0.15; an exact copy at
    δ = 0), the float32 just below 1.0 does not extract black. Def. 2: the extracted image's
    k-eidetic count includes itself (distance 0 ≤ δ), so k = 1 here, 0 when nothing is extracted."""
    training = _training({"white": _white()})
    for typed in DELTA_TYPES:  # the decision never depends on δ's type (np.float64 missed the tie)
        got = verify_candidates(_cands(list(CANDIDATES)), np.stack(list(CANDIDATES.values())), training,
                                delta=typed(delta), grid=4, n_nearest=1)  # fmt: skip
        assert _decisions(got) == want, typed
        # exact near δ and near 0 on both product paths; elsewhere float32 products may be off
        # by their error bound (black vs white: 0.99999994 when δ is far from 1)
        np.testing.assert_allclose(got["tiled_l2"].to_numpy(), [1.0, 0.0, 0.15], rtol=0, atol=1e-6)
        near = np.abs(np.float32([1.0, 0.0, 0.15]) - np.float32(delta)) < 1e-3
        assert (got["tiled_l2"].to_numpy()[near] == np.float32([1.0, 0.0, 0.15])[near]).all()


def test_eidetic_count_includes_a_training_image_at_exactly_delta():
    """Def. 2: the k-eidetic count is the number of training images within δ (≤ δ) of the
    extracted image x. Black is 0.5 from the quarter-white x and sqrt(1/2) from the half-white y;
    y is 0.5 from x. At δ = 0.5 black extracts x (tie) and both x and y (tie) count: k = 2."""
    training = _training({"x": _quarter_white(), "y": _half_white()})
    got = verify_candidates(_cands(["black"]), _black()[None], training, delta=0.5, grid=4, n_nearest=2)
    assert got["train_id"].tolist() == ["x", "y"]
    assert got["extracted"].tolist() == [True, False]
    assert (got["eidetic_k"] == 2).all()


def _index(tmp_path, images: dict) -> IndexVerifier:
    folder = tmp_path / "train"
    folder.mkdir()
    for name, img in images.items():
        Image.fromarray(img).save(folder / f"{name}.png")
    build_index(folder, tmp_path / "idx", embedder="pixel:8", index_type="flat", progress=False)
    return IndexVerifier(IndexVerification(str(tmp_path / "idx"), len(images)))


@pytest.fixture(scope="module")
def white_index(tmp_path_factory):
    return _index(tmp_path_factory.mktemp("white"), {"white": _white()})


@pytest.mark.usefixtures("products")
@pytest.mark.parametrize(("delta", "want"), CASES, ids=["tie-1.0", "below-1.0", "tie-0.15", "copy-at-0"])
def test_indexed_verification_extracts_at_distance_equal_to_delta(white_index, delta, want):
    """Def. 1 and 2 through a training index (``extract --index``): the same hand-worked
    decisions as the full path — distance ≤ δ extracts, and the k-eidetic count (among the
    retrieved images) includes x itself."""
    for typed in DELTA_TYPES:
        got, stats = verify_candidates_indexed(_cands(list(CANDIDATES)), np.stack(list(CANDIDATES.values())),
                                               white_index, delta=typed(delta), grid=4, n_nearest=1)  # fmt: skip
        assert stats["unverified_count"] == 0
        assert _decisions(got) == want, typed


def test_indexed_eidetic_count_includes_a_training_image_at_exactly_delta(tmp_path):
    """Def. 2 through the index: black extracts the quarter-white x at δ = 0.5 (tie) and the
    half-white y, 0.5 from x, counts too: k = 2 among the 2 retrieved."""
    v = _index(tmp_path, {"x": _quarter_white(), "y": _half_white()})
    got, _ = verify_candidates_indexed(_cands(["black"]), _black()[None], v, delta=0.5, grid=4, n_nearest=2)
    assert got["train_id"].tolist() == ["x", "y"]
    assert got["extracted"].tolist() == [True, False]
    assert (got["eidetic_k"] == 2).all() and (got["retrieved"] == 2).all()


# ---------------------------------------------------------------------------------------------
# 3. the calibrated decision: ℓ < 1, strictly


def _white_on(n_of_16: int) -> np.ndarray:
    """Black with the first ``n_of_16`` pixels of every 4×4 block white (all channels): plain ℓ2
    from black sqrt(n/16) — 1/16 → 0.25, 9/16 → 0.75."""
    out = _black()
    block = np.zeros(16, bool)
    block[:n_of_16] = True
    out[np.tile(block.reshape(4, 4), (4, 4))] = 255
    return out


def test_calibrated_distance_of_exactly_one_is_not_extracted():
    """Carlini et al. 2023 (unconditional): x̂ extracts x when ℓ = ℓ2(x̂, x) / (α_c · mean ℓ2 to
    its n nearest) < 1, strictly. n = 1, α_c = 1: ℓ = d / d = 1 → not extracted. Paper α_c = 0.5,
    n = 2, distances 0.25 and 0.75: ℓ = 0.25 / (0.5 · 0.5) = 1 → not extracted; an exact copy of
    the nearer image (ℓ = 0) is."""
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    q = rng.integers(0, 256, (3, S, S, 3), dtype=np.uint8)
    r = calibrated_distance(q, train[:1], CalibratedConfig(n=1, alpha_c=1.0))
    assert (r.calibrated == 1.0).all() and not r.extracted.any()

    pair = np.stack([_white_on(1), _white_on(9)])
    r = calibrated_distance(np.stack([_black(), _white_on(1)]), pair, CalibratedConfig(n=2, alpha_c=0.5))
    assert r.nearest_distance[0] == 0.25 and r.mean_distance[0] == 0.5
    assert r.calibrated.tolist() == [1.0, 0.0]
    assert r.extracted.tolist() == [False, True]


class _BlackThenCopy:
    """Unconditional generator: sample 0 black (ℓ = 1 exactly), sample 1 a copy of the nearer
    training image (ℓ = 0)."""

    def __init__(self):
        from memscan.extraction.unconditional import SEED_STREAM
        from memscan.generators.seeds import derive_seed

        self.index = {derive_seed(0, SEED_STREAM, i): i for i in range(2)}

    def generate(self, prompt, seeds):
        return np.stack([_black() if self.index[s] == 0 else _white_on(1) for s in seeds])


def test_unconditional_extraction_does_not_extract_at_calibrated_distance_one(tmp_path):
    """The same rule, ℓ < 1 strictly, through ``extract-unconditional`` with the paper's
    α_c = 0.5 and n = 2: training images 0.25 and 0.75 (plain ℓ2) from the black generation give
    ℓ = 1 → not extracted; the exact copy (ℓ = 0) is."""
    from memscan.extraction.unconditional import UnconditionalConfig, extract_unconditional

    train = tmp_path / "train"
    train.mkdir()
    Image.fromarray(_white_on(1)).save(train / "near.png")
    Image.fromarray(_white_on(9)).save(train / "far.png")
    cfg = UnconditionalConfig(samples=2, n_nearest=2, alpha_c=0.5, batch_size=2, shard_size=2, save_images=False)
    res = extract_unconditional(_BlackThenCopy(), train, tmp_path / "run", cfg, progress=False)
    g = res.generations.sort_values("sample_index")
    assert g["nearest_train_id"].tolist() == ["near", "near"]
    assert g["nearest_distance"].tolist() == [0.25, 0.0] and g["mean_distance"].iloc[0] == 0.5
    assert g["calibrated"].tolist() == [1.0, 0.0]
    assert g["extracted"].tolist() == [False, True]
