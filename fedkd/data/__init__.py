"""Datasets, partitioners and the federation's splits."""

from fedkd.data.datasets import DATASETS, OfficialDataset, Pool
from fedkd.data.partition import PARTITIONERS
from fedkd.data.prepare import (
    ClientData,
    FederatedData,
    build_federated_data,
    load_federated_data,
    prepare_federated_data,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ClientData",
    "FederatedData",
    "OfficialDataset",
    "Pool",
    "build_federated_data",
    "load_federated_data",
    "prepare_federated_data",
]
