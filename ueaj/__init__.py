"""Tools for training Flax NNX models; see `ueaj.opt`."""
