"""Datasets: the registry of data sets and their loaders into uint8 tensors (`datasets`)."""
