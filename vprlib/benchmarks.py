"""Placeholder while this module is being written (replaced by its owner)."""


def load_benchmark(*args, **kwargs):
    raise NotImplementedError("load_benchmark is being written")
