"""uda-reid: unsupervised domain adaptation for person re-identification."""

__version__ = "0.1.0"
