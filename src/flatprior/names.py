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
