import torch

from mnistlab.augment import Augmentation, augment, elastic_field, random_affine


def digit_batch(n=8):
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 8:20, 12:15] = 1.0  # a vertical bar, left of centre-ish
    x[:, :, 8:11, 12:20] = 1.0  # and a top bar, so flips and rotations show
    return x


def test_no_augmentation_is_the_identity():
    x = digit_batch()
    out = augment(x, Augmentation(), torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_seeded_and_different_per_image():
    x, aug = digit_batch(), Augmentation(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1, zoom_range=0.1)
    a = augment(x, aug, torch.Generator().manual_seed(1))
    b = augment(x, aug, torch.Generator().manual_seed(1))
    c = augment(x, aug, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # one transform per image, not one per batch


def test_transforms_stay_within_their_ranges():
    aug = Augmentation(rotation_range=10, width_shift_range=0.1, height_shift_range=0.2, zoom_range=0.1)
    theta = random_affine(10_000, aug, torch.Generator().manual_seed(0))
    assert theta[:, 0, 2].abs().max() <= 0.2 and theta[:, 0, 2].abs().max() > 0.19   # 10% of width = 0.2 units
    assert theta[:, 1, 2].abs().max() <= 0.4 and theta[:, 1, 2].abs().max() > 0.39
    angle = torch.atan2(theta[:, 1, 0], theta[:, 0, 0]).rad2deg()
    assert angle.abs().max() <= 10 and angle.abs().max() > 9.9
    zoom_x = theta[:, :, 0].norm(dim=1)
    assert zoom_x.min() >= 0.9 - 1e-6 and zoom_x.max() <= 1.1 + 1e-6


def test_a_pure_shift_moves_pixels_by_whole_steps():
    x = digit_batch(1)
    theta = torch.tensor([[[1.0, 0.0, 2 * 3 / 28], [0.0, 1.0, 0.0]]])  # sample 3 pixels to the right
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    assert torch.allclose(out[..., :, :20], x[..., :, 3:23], atol=1e-5)


def test_horizontal_flip_mirrors_about_half_the_images():
    x = digit_batch(200)
    out = augment(x, Augmentation(horizontal_flip=True), torch.Generator().manual_seed(0))
    mirrored = (out - x[0].flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    same = (out - x[0]).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert torch.all(mirrored | same) and 60 < mirrored.sum() < 140


def test_elastic_field_is_smooth_zero_mean_and_scales_with_alpha():
    small = elastic_field(500, 28, 28, 10, 4, torch.Generator().manual_seed(0)) * 14  # in pixels
    large = elastic_field(500, 28, 28, 30, 4, torch.Generator().manual_seed(0)) * 14
    assert torch.allclose(large, 3 * small, atol=1e-4)
    assert small.mean().abs() < 0.02 and 0.1 < small.abs().mean() < 1.0
    # neighbours move together: a step of one pixel changes the displacement far less than it varies
    step = (small[:, :, 1:] - small[:, :, :-1]).abs().mean()
    assert step < 0.2 * small.abs().mean()
    rough = elastic_field(500, 28, 28, 10, 0.5, torch.Generator().manual_seed(0)) * 14
    assert (rough[:, :, 1:] - rough[:, :, :-1]).abs().mean() > 3 * step


def test_elastic_distortion_warps_each_image_and_keeps_a_flat_image_flat():
    x, aug = digit_batch(), Augmentation(elastic_alpha=34, elastic_sigma=4)
    a = augment(x, aug, torch.Generator().manual_seed(1))
    assert torch.equal(a, augment(x, aug, torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, x, atol=1e-2) and not torch.allclose(a[0], a[1], atol=1e-2)
    rows = torch.arange(28.0).view(1, 1, 28, 1)
    centre = lambda images: (images * rows).sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))
    assert (centre(a) - centre(x)).abs().max() < 3  # the strokes bend locally; the digit stays in place
    flat = torch.full((4, 1, 28, 28), 0.5)
    assert torch.allclose(augment(flat, aug, torch.Generator().manual_seed(0)), flat, atol=1e-6)


def test_settings_name_what_warps():
    assert Augmentation().settings() == {} and not Augmentation().active
    assert Augmentation(rotation_range=10).settings() == {"rotation_range": 10}  # no idle elastic sigma
    assert Augmentation(elastic_alpha=34, elastic_sigma=6).settings() == {"elastic_alpha": 34, "elastic_sigma": 6}
    assert Augmentation(elastic_sigma=6).active is False  # sigma alone does not warp
