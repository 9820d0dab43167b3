"""uda-reid: unsupervised domain adaptation for person re-identification.

`uda.load_model(path)` gives a trained model as a callable from images (PIL or paths) to
L2-normalised features, with its run's own preprocessing (see uda.extract)."""

__version__ = "0.1.0"


def load_model(path, device: str = "auto", batch_size: int | None = None, opts=()):
    """uda.extract.load_model, imported on first use so that `import uda` stays light."""
    from uda.extract import load_model as _load_model

    return _load_model(path, device, batch_size, opts)
