"""The training layer: encoders, cached features, layer selection, heads, trainer, evaluation, and
:class:`AlignedModel` (using a trained model). Submodules are imported on first use."""


def __getattr__(name: str):
    if name in ("AlignedModel", "ZeroShotResult"):
        from . import aligned

        return getattr(aligned, name)
    raise AttributeError(f"module 'structure_ops.train' has no attribute {name!r}")
