"""Placeholder while this module is being written (replaced by its owner)."""


def VPRModel(*args, **kwargs):
    raise NotImplementedError("VPRModel is being written")


def load_pretrained(*args, **kwargs):
    raise NotImplementedError("load_pretrained is being written")
