"""Names of the datasets, models and optimizers, without importing torch.

:class:`flatprior.config.RunConfig` validates against these tuples, so resolving a spec or
running ``flatprior list`` never loads PyTorch. The registries that build the objects
(:func:`flatprior.data.make_task`, :func:`flatprior.models.make_model`,
:data:`flatprior.train.OPTIMIZERS`) use the same names; ``tests/test_config.py`` checks that
they agree.
"""

DATASETS = ("boolean", "digits", "mnist", "cifar10", "file")
MODELS = ("fcn", "cnn", "resnet18", "resnet50")
OPTIMIZERS = ("sgd", "momentum", "adam", "adagrad", "rmsprop", "adadelta", "gd", "entropy-sgd",
              "sam", "asam")

#: an FCN's hidden widths unless set (``make_model`` and ``RunConfig`` default to them)
DEFAULT_HIDDEN = (40, 40)


def architecture_mismatch(model: str, hidden, width) -> str | None:
    """Why ``hidden`` / ``width`` do not apply to ``model``, or ``None`` if they do.

    ``hidden`` (layer widths) is an FCN's, ``width`` (base channels) a ResNet's; each is
    ignored by the other models, which would silently label a network with a size it does not
    have. ``hidden`` at its default :data:`DEFAULT_HIDDEN` counts as not set.
    """
    if model != "fcn" and tuple(hidden) != DEFAULT_HIDDEN:
        return (f"hidden sets the layer widths of an fcn; {model!r} has its own architecture "
                "(resnets: width=...); drop hidden or use model fcn")
    if width is not None and not model.startswith("resnet"):
        return (f"width sets the base channels of resnet18/resnet50, not of {model!r}; for an "
                "fcn set hidden, e.g. hidden=[20, 20]")
    return None
