"""mnistlab against the tutorials' own Keras/TensorFlow code: same data, recipe, epochs, batch.

    pip install -e ".[bench]"                                   # tensorflow-cpu, only for this
    python benchmarks/vs_keras.py --recipe seed003               # 5 epochs, as the tutorial
    python benchmarks/vs_keras.py --recipe seed000 --epochs 2    # per-epoch speed of the big net

Each framework runs in its own child process, one at a time (two processes that each use both
cores slow each other down tens of times), alternating mnistlab, Keras, mnistlab, Keras ... for
--repeats rounds; the table gives medians and the ratio measured in this one run.
Both train on the same 54,000 images and validate on the same 6,000 (seed000: on the test set,
as that tutorial does), and report accuracy on the 10,000 test images.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def keras_model(recipe: str):
    """The tutorials' Keras models, written as they are (softmax output, Keras defaults)."""
    import keras
    from keras import layers
    if recipe == "seed003":
        return keras.Sequential([
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.Flatten(), layers.Dense(64, activation="relu"), layers.Dense(10, activation="softmax")])
    if recipe == "seed000":
        return keras.Sequential([
            keras.Input((28, 28, 1)),
            layers.Conv2D(64, 3, activation="relu"), layers.BatchNormalization(),
            layers.Conv2D(64, 3, activation="relu"), layers.BatchNormalization(),
            layers.MaxPooling2D(2), layers.Dropout(0.25),
            layers.Conv2D(128, 3, activation="relu"), layers.BatchNormalization(),
            layers.Conv2D(128, 3, activation="relu"), layers.BatchNormalization(),
            layers.MaxPooling2D(2), layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(512, activation="relu"), layers.BatchNormalization(), layers.Dropout(0.5),
            layers.Dense(256, activation="relu"), layers.BatchNormalization(), layers.Dropout(0.5),
            layers.Dense(10, activation="softmax")])
    raise SystemExit(f"no Keras model for recipe {recipe}; choose seed003 or seed000")


def run_keras(recipe: str, epochs: int, seed: int) -> dict:
    import keras
    from mnistlab import data
    from mnistlab.config import resolve_config
    config = resolve_config(recipe, overrides={"epochs": epochs, "seed": seed})
    keras.utils.set_random_seed(seed)
    train, test = data.load("mnist", "train"), data.load("mnist", "test")
    scale = lambda t: (t.numpy()[..., None] / 255.0).astype("float32")  # the tutorials' /255
    if config.val_data == "test":
        x, y, val = scale(train.images), train.labels.numpy(), (scale(test.images), test.labels.numpy())
    else:
        tx, ty, vx, vy = data.train_val_split(train.images, train.labels, config.val_split, seed)
        x, y, val = scale(tx), ty.numpy(), (scale(vx), vy.numpy())
    model = keras_model(recipe)
    optimizer = keras.optimizers.RMSprop() if config.optimizer == "rmsprop" else keras.optimizers.Adam()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = []
    if config.reduce_lr_monitor:
        callbacks.append(keras.callbacks.ReduceLROnPlateau(config.reduce_lr_monitor, factor=config.reduce_lr_factor,
                                                           patience=config.reduce_lr_patience,
                                                           min_lr=config.reduce_lr_min_lr))
    if config.early_stopping_monitor:
        callbacks.append(keras.callbacks.EarlyStopping(config.early_stopping_monitor,
                                                       patience=config.early_stopping_patience,
                                                       restore_best_weights=config.restore_best_weights))

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    seconds: list[float] = []
    start = time.perf_counter()
    model.fit(x, y, batch_size=config.batch_size, epochs=epochs, validation_data=val, verbose=0,
              callbacks=callbacks + [EpochTimer()])
    fit_seconds = time.perf_counter() - start
    loss, accuracy = model.evaluate(scale(test.images), test.labels.numpy(), batch_size=1000, verbose=0)
    return {"epoch_seconds": seconds, "fit_seconds": fit_seconds, "test_accuracy": accuracy,
            "train_images": len(y), "versions": f"tensorflow {__import__('tensorflow').__version__}, "
                                                f"keras {keras.__version__}"}


def run_mnistlab(recipe: str, epochs: int, seed: int) -> dict:
    import torch
    from mnistlab.config import resolve_config
    from mnistlab.train import fit
    config = resolve_config(recipe, overrides={"epochs": epochs, "seed": seed})
    start = time.perf_counter()
    result = fit(config, progress=False)
    fit_seconds = time.perf_counter() - start
    train_images = 60_000 if config.val_data == "test" else 54_000
    return {"epoch_seconds": [row["seconds"] for row in result.history], "fit_seconds": result.train_seconds,
            "total_seconds": fit_seconds, "test_accuracy": result.metrics.test_accuracy,
            "train_images": train_images, "versions": f"torch {torch.__version__}"}


def child(framework: str, recipe: str, epochs: int, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--recipe", recipe, "--epochs", str(epochs),
           "--seed", str(seed)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{framework} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="seed003", choices=["seed003", "seed000"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (seed003: 5)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["keras", "mnistlab"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = args.epochs or {"seed003": 5, "seed000": 50}[args.recipe]
    if args.worker:
        run = run_keras if args.worker == "keras" else run_mnistlab
        print(json.dumps(run(args.recipe, epochs, args.seed)))
        return

    results = {"mnistlab": [], "keras": []}
    for round_ in range(args.repeats):
        for framework in ("mnistlab", "keras"):
            r = child(framework, args.recipe, epochs, args.seed + round_)
            results[framework].append(r)
            print(f"round {round_ + 1} {framework}: epochs {[round(s, 1) for s in r['epoch_seconds']]} s, "
                  f"test accuracy {r['test_accuracy']:.4f}", flush=True)

    def summary(runs):
        per_epoch = statistics.median(s for r in runs for s in r["epoch_seconds"][1:] or r["epoch_seconds"])
        return {"per_epoch": per_epoch, "images_s": runs[0]["train_images"] / per_epoch,
                "fit": statistics.median(r["fit_seconds"] for r in runs),
                "acc": [r["test_accuracy"] for r in runs], "versions": runs[0]["versions"]}

    ours, theirs = summary(results["mnistlab"]), summary(results["keras"])
    print(f"\n# vs_keras: recipe {args.recipe}, {epochs} epochs, {args.repeats} rounds, {time.strftime('%Y-%m-%d')}")
    print(f"# {ours['versions']}; {theirs['versions']}\n")
    print("| | s/epoch (median, epochs 2+) | images/s | whole fit s (median) | test accuracy per round |\n|---|---|---|---|---|")
    for name, s in (("mnistlab", ours), ("Keras/TF", theirs)):
        print(f"| {name} | {s['per_epoch']:.2f} | {s['images_s']:,.0f} | {s['fit']:.1f} | "
              f"{', '.join(f'{a:.4f}' for a in s['acc'])} |")
    print(f"\nspeed-up per epoch (Keras s / mnistlab s): {theirs['per_epoch'] / ours['per_epoch']:.2f}x; "
          f"whole fit: {theirs['fit'] / ours['fit']:.2f}x")
    print("command: python benchmarks/vs_keras.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
