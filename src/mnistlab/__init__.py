"""mnistlab: train, explain, tune and serve small CNNs for MNIST-family images."""
__version__ = "0.1.0"


def load(run, engine: str = "torch", int8: bool = False):
    """A trained run folder's model with Keras's habits: `.predict(images)`, `.evaluate(x, y)`, `.summary()`.
    (mnistlab.predict.Predictor; imported here lazily, so `import mnistlab` stays light.)"""
    from .predict import load
    return load(run, engine, int8)
