"""mnistlab: train, explain, tune and serve small CNNs for MNIST-family images."""
__version__ = "0.1.0"
