"""Placeholder while this module is being written (replaced by its owner)."""


def GSVCitiesDataset(*args, **kwargs):
    raise NotImplementedError("GSVCitiesDataset is being written")


def gsv_filename(*args, **kwargs):
    raise NotImplementedError("gsv_filename is being written")


def parse_gsv_filename(*args, **kwargs):
    raise NotImplementedError("parse_gsv_filename is being written")


def read_gsv_dataframes(*args, **kwargs):
    raise NotImplementedError("read_gsv_dataframes is being written")


def scan_gsv_images(*args, **kwargs):
    raise NotImplementedError("scan_gsv_images is being written")
