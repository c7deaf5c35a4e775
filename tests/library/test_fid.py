"""FID / KID against closed forms and a second implementation; extractors; the reference cache."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion.data import ImageSet, load_prepared
from diffusion.evaluate import extract, reference_key, reference_stats
from diffusion.features import (accuracy, load_domain_extractor, load_inception, save_classifier,
                                train_classifier)
from diffusion.fid import FeatureStats, frechet_distance, kernel_inception_distance
from diffusion.quality import classifier_quality
from tests.helpers import digits_dir


def sqrtm_2x2(m):
    """Closed form: sqrt(M) = (M + s I) / t with s = sqrt(det M), t = sqrt(tr M + 2 s)."""
    s = math.sqrt(np.linalg.det(m))
    return (m + s * np.eye(2)) / math.sqrt(np.trace(m) + 2 * s)


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    ref = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)).value == pytest.approx(ref, rel=1e-10)


def test_frechet_rotated_covariance_closed_form():
    a = np.array([[2.0, 0.3], [0.3, 0.5]])
    th = 0.7
    r = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    b = r @ np.diag([3.0, 0.2]) @ r.T
    ra = sqrtm_2x2(a)
    ref = np.trace(a) + np.trace(b) - 2 * np.trace(sqrtm_2x2(ra @ b @ ra)) + 0.5 ** 2
    got = frechet_distance(np.zeros(2), a, np.array([0.5, 0.0]), b).value
    assert got == pytest.approx(ref, rel=1e-9)


def test_identical_sets_and_singular_covariances():
    x = np.random.default_rng(0).normal(size=(500, 6))
    s = FeatureStats(6)
    s.update(x)
    assert frechet_distance(s.mean, s.cov, s.mean, s.cov).value == pytest.approx(0, abs=1e-8)
    rank1 = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])           # rank-deficient covariances
    res = frechet_distance(np.zeros(3), rank1, np.zeros(3), np.zeros((3, 3)))
    # sqrtm of the zero product is finite (zero): the reference rule adds nothing, FID is exact
    assert res.value == pytest.approx(np.trace(rank1), rel=1e-12) and res.notes == ()
    # a product with no finite square root (nilpotent): eps on both diagonals, as pytorch-fid does
    nil = np.array([[0.0, 1.0], [0.0, 0.0]])
    res = frechet_distance(np.zeros(2), nil, np.zeros(2), np.eye(2))
    assert res.notes == ("product of covariances is singular; added 1e-06 to both diagonals",)
    e = 1e-6
    eig = np.linalg.eigvals((nil + e * np.eye(2)) @ (np.eye(2) + e * np.eye(2)))
    assert res.value == pytest.approx(np.trace(nil) + 2 - 2 * np.sqrt(eig.astype(complex)).real.sum(),
                                      rel=1e-6)


def eigen_fid(mu1, s1, mu2, s2) -> float:
    """An independent FID (torchmetrics' formulation): tr((S1 S2)^1/2) as the sum of the square
    roots of the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2), in torch float64."""
    m1, m2, a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, mu2, s1, s2))
    roots = torch.linalg.eigvals(a @ b).sqrt().real.sum()
    return float((m1 - m2).square().sum() + a.trace() + b.trace() - 2 * roots)


def test_rank_deficient_fid_matches_an_independent_implementation():
    """Features with dead units (exact zeros, as ReLU features have): scipy warns that S1 S2 is
    singular, but its root is finite, so nothing is added (pytorch-fid's rule) and FID equals the
    eigenvalue formula. Adding eps on the warning moved FID by about 1e-4 relative."""
    rng = np.random.default_rng(0)
    a, b = np.zeros((40, 10)), np.zeros((40, 10))
    a[:, :6] = rng.normal(size=(40, 6))                       # units 6..9 dead in the first set
    b[:, 3:] = rng.normal(size=(40, 7)) + 0.5                 # units 0..2 dead in the second
    sa, sb = FeatureStats(10), FeatureStats(10)
    sa.update(a)
    sb.update(b)
    res = frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)
    assert not any("added" in n for n in res.notes)
    assert res.value == pytest.approx(eigen_fid(sa.mean, sa.cov, sb.mean, sb.cov), rel=1e-9)


def test_streaming_statistics_equal_batch_statistics():
    x = np.random.default_rng(1).normal(size=(1003, 5)) * [1, 2, 3, 4, 5] + 7
    s = FeatureStats(5)
    for i in range(0, 1003, 97):
        s.update(x[i:i + 97])
    assert s.n == 1003
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError, match=r"features must have shape \(B, 5\)"):
        s.update(np.zeros((2, 4)))


def test_kid_matches_a_direct_unbiased_estimate():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.5, 1, size=(30, 4))
    k = lambda a, b: (a @ b / 4 + 1) ** 3                              # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    yy = sum(k(y[i], y[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
    xy = sum(k(x[i], y[j]) for i in range(30) for j in range(30)) / 900
    kid, _ = kernel_inception_distance(x, y, num_subsets=1, subset_size=30)
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    same, _ = kernel_inception_distance(rng.normal(size=(400, 4)), rng.normal(size=(400, 4)),
                                        num_subsets=20, subset_size=200)
    assert abs(same) < 0.05                                            # unbiased: ~0 for equal laws


@pytest.fixture(scope="module")
def digits_extractor(tmp_path_factory):
    train, heldout = load_prepared(digits_dir(), "train"), load_prepared(digits_dir(), "heldout")
    model, acc = train_classifier(train, heldout, epochs=20, progress=False)
    path = tmp_path_factory.mktemp("ext") / "extractor.pt"
    save_classifier(model, path, {"heldout_accuracy": acc})
    return load_domain_extractor(path), acc


def test_domain_extractor_learns_the_digits(digits_extractor):
    extractor, acc = digits_extractor
    assert acc > 0.85 and len(extractor.sha256) == 64 and extractor.dim == 128


def test_recognisability_of_real_and_noise_digits(digits_extractor):
    extractor, _ = digits_extractor
    heldout = load_prepared(digits_dir(), "heldout", in_memory=True)
    real = classifier_quality(extractor.probabilities(heldout.images), heldout.labels.numpy())
    # agreement with the true labels is the classifier's accuracy, computed independently
    assert real["label_agreement"] == pytest.approx(accuracy(extractor.model, heldout), abs=1e-9)
    assert real["class_entropy_ratio"] > 0.95          # the packaged digits are balanced
    assert real["confident_share"] > 0.6
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, heldout.images.shape, generator=g, dtype=torch.uint8)
    fake = classifier_quality(extractor.probabilities(noise), heldout.labels.numpy())
    assert fake["label_agreement"] < 0.3               # chance is 0.1
    blank = classifier_quality(extractor.probabilities(torch.zeros_like(heldout.images)))
    assert blank["class_entropy_ratio"] == 0.0         # identical images: one class


def test_fid_grows_as_real_images_get_noisier(digits_extractor):
    extractor, _ = digits_extractor
    train, heldout = load_prepared(digits_dir(), "train"), load_prepared(digits_dir(), "heldout", in_memory=True)
    ref = FeatureStats(128)
    ref.update(extract(extractor, train.images))
    g = torch.Generator().manual_seed(0)
    values = []
    for sigma in (0, 20, 40, 80, 160):
        noisy = (heldout.images.float() + sigma * torch.randn(heldout.images.shape, generator=g))
        s = FeatureStats(128)
        s.update(extract(extractor, noisy.round().clamp(0, 255).to(torch.uint8)))
        values.append(frechet_distance(s.mean, s.cov, ref.mean, ref.cov).value)
    assert all(a < b for a, b in zip(values, values[1:])), values


class StandInInception(nn.Module):
    """Same call signature as inception-2015-12-05.pt: uint8 NCHW 299x299 in, 2048-d features."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299
        return self.proj(x.float().mean(dim=(2, 3)) / 255.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # the test builds TorchScript itself
def test_torchscript_inception_path(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(StandInInception()), str(path))
    ext = load_inception(path)
    feats = ext(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8))
    assert feats.shape == (5, 2048) and feats.dtype == np.float64
    with pytest.raises(Exception, match="file not found"):
        load_inception(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(Exception, match="junk.pt: not a TorchScript module"):
        load_inception(tmp_path / "junk.pt")


def test_reference_cache_is_keyed_and_never_stale(tmp_path):
    calls = []

    class Counting:
        name, dim = "counting", 2

        def __init__(self, sha):
            self.sha256 = sha

        def __call__(self, images):
            calls.append(len(images))
            return images.float().flatten(1)[:, :2].double().numpy()

    imgs = ImageSet(torch.randint(0, 255, (40, 1, 4, 4), dtype=torch.uint8), torch.zeros(40, dtype=torch.long), 1)
    a, hit = reference_stats(tmp_path, imgs, Counting("e1"), dataset="v1", split="train")
    assert not hit and len(calls) == 1
    b, hit = reference_stats(tmp_path, imgs, Counting("e1"), dataset="v1", split="train")
    assert hit and len(calls) == 1 and np.array_equal(a.sigma, b.sigma)
    for changed in (dict(dataset="v2", split="train"), dict(dataset="v1", split="heldout")):
        _, hit = reference_stats(tmp_path, imgs, Counting("e1"), **changed)
        assert not hit
    _, hit = reference_stats(tmp_path, imgs, Counting("e2"), dataset="v1", split="train")
    assert not hit                                                  # another extractor
    smaller = ImageSet(imgs.images[:30], imgs.labels[:30], 1)
    _, hit = reference_stats(tmp_path, smaller, Counting("e1"), dataset="v1", split="train")
    assert not hit                                                  # another sample count
    keys = {reference_key("v1", "e1", 4, "train", 40), reference_key("v1", "e1", 8, "train", 40)}
    assert len(keys) == 2                                           # another resolution
