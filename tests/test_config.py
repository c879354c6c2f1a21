import pytest

from mnistlab.config import RECIPES, TrainConfig, read_config_file, resolve_config
from mnistlab.errors import MnistlabError


def test_resolution_order_defaults_recipe_file_flags(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('recipe = "seed002"\nbatch-size = 100\nepochs = 3\nrotation_range = 5\n')
    config = resolve_config(config_file=file, overrides={"epochs": 7})
    assert config.recipe == "seed002" and config.model == "seed002"     # from the recipe named in the file
    assert config.loss == "categorical_crossentropy"                     # recipe over default
    assert config.batch_size == 100 and config.rotation_range == 5.0     # file over recipe (both spellings)
    assert config.epochs == 7                                            # flag over file
    assert config.seed == TrainConfig().seed                             # untouched default


def test_every_recipe_resolves_to_a_valid_config():
    for name, settings in RECIPES.items():
        config = resolve_config(name)
        assert config.model == settings["model"] and config.recipe == name


def test_recipes_are_the_tutorials():
    seed000 = resolve_config("seed000")
    assert (seed000.optimizer, seed000.batch_size, seed000.epochs, seed000.val_data) == ("adam", 32, 50, "test")
    assert (seed000.reduce_lr_monitor, seed000.reduce_lr_factor, seed000.reduce_lr_patience,
            seed000.reduce_lr_min_lr) == ("val_loss", 0.2, 3, 1e-5)
    assert (seed000.early_stopping_monitor, seed000.early_stopping_patience, seed000.restore_best_weights) == (
        "val_loss", 10, True)
    seed002 = resolve_config("seed002")
    assert (seed002.batch_size, seed002.epochs, seed002.reduce_lr_monitor, seed002.reduce_lr_factor) == (
        86, 30, "val_accuracy", 0.5)
    assert (seed002.rotation_range, seed002.zoom_range, seed002.width_shift_range) == (10, 0.1, 0.1)
    assert resolve_config("seed001").dataset == "fashion-mnist"


@pytest.mark.parametrize("text, message", [
    ("batch_sise = 3\n", "unknown setting 'batch_sise'"),
    ("epochs = 'five'\n", "epochs = 'five' should be a int"),
    ("epochs = \n", "not valid TOML"),
    ("horizontal_flip = true\n", "fashion-mnist only"),
    ("reduce_lr_monitor = 'val_los'\n", "unknown monitor 'val_los'"),
    ("val_split = 0\nearly_stopping_monitor = 'val_loss'\n", "needs validation data"),
    ("elastic_alpha = -3\n", "elastic distortion needs alpha >= 0"),
    ("elastic_alpha = 34\nelastic_sigma = 0\n", "sigma in \\(0, 14\\] pixels, not alpha 34.0 sigma 0.0"),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    file = tmp_path / "c.toml"
    file.write_text(text)
    with pytest.raises(MnistlabError, match=message):
        resolve_config(config_file=file)


def test_unknown_recipe_and_missing_file():
    with pytest.raises(MnistlabError, match="unknown recipe 'seed9'"):
        resolve_config("seed9")
    with pytest.raises(MnistlabError, match="does not exist"):
        read_config_file("/nonexistent/c.toml")


def test_ints_are_accepted_for_floats_and_lr(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("lr = 1\nlabel_smoothing = 0\n")
    assert read_config_file(file) == {"lr": 1.0, "label_smoothing": 0.0}
