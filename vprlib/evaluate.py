"""Placeholder while this module is being written (replaced by its owner)."""


def evaluate(*args, **kwargs):
    raise NotImplementedError("evaluate is being written")


def extract_descriptors(*args, **kwargs):
    raise NotImplementedError("extract_descriptors is being written")


def recall_at_k(*args, **kwargs):
    raise NotImplementedError("recall_at_k is being written")


def search(*args, **kwargs):
    raise NotImplementedError("search is being written")
