"""Datasets for FedPatchCore: readers (MVTec AD, AutoVI / MVTec LOCO, plain folders), a
deterministic synthetic generator, and partitioners that split a dataset across federated sites.

Datasets hold paths only and load images lazily, so they are cheap to build and plain data.
"""

from core.data.autovi import AUTOVI_OBJECTS as AUTOVI_OBJECTS
from core.data.autovi import AutoVIDataset as AutoVIDataset
from core.data.dataset import DEFAULT_SATURATION as DEFAULT_SATURATION
from core.data.dataset import AnomalyDataset as AnomalyDataset
from core.data.dataset import GroundTruthChannel as GroundTruthChannel
from core.data.defects import DEFECTS_CONFIG_FILENAME as DEFECTS_CONFIG_FILENAME
from core.data.defects import DefectType as DefectType
from core.data.defects import defects_config_to_json as defects_config_to_json
from core.data.defects import load_defects_config as load_defects_config
from core.data.defects import parse_defects_config as parse_defects_config
from core.data.errors import DatasetError as DatasetError
from core.data.folder import ImageFolderDataset as ImageFolderDataset
from core.data.imageio import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from core.data.mvtec import MVTecDataset as MVTecDataset
from core.data.partition import CategoryPartitioner as CategoryPartitioner
from core.data.partition import DirichletPartitioner as DirichletPartitioner
from core.data.partition import IIDPartitioner as IIDPartitioner
from core.data.partition import Partitioner as Partitioner
from core.data.sample import GOOD as GOOD
from core.data.sample import ImageSample as ImageSample
from core.data.synthetic import DEFAULT_SYNTHETIC_CATEGORIES as DEFAULT_SYNTHETIC_CATEGORIES
from core.data.synthetic import SYNTHETIC_CATEGORIES as SYNTHETIC_CATEGORIES
from core.data.synthetic import SYNTHETIC_DEFECTS as SYNTHETIC_DEFECTS
from core.data.synthetic import SYNTHETIC_VARIANTS as SYNTHETIC_VARIANTS
from core.data.synthetic import SyntheticConfig as SyntheticConfig
from core.data.synthetic import generate_synthetic_dataset as generate_synthetic_dataset
from core.data.synthetic import render_synthetic_image as render_synthetic_image
from core.data.synthetic import synthetic_defect_types as synthetic_defect_types
from core.data.synthetic import synthetic_image_rng as synthetic_image_rng

__all__ = [
    "AUTOVI_OBJECTS",
    "DEFAULT_SATURATION",
    "DEFAULT_SYNTHETIC_CATEGORIES",
    "DEFECTS_CONFIG_FILENAME",
    "GOOD",
    "IMAGE_SUFFIXES",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_DEFECTS",
    "SYNTHETIC_VARIANTS",
    "AnomalyDataset",
    "AutoVIDataset",
    "CategoryPartitioner",
    "DatasetError",
    "DefectType",
    "DirichletPartitioner",
    "GroundTruthChannel",
    "IIDPartitioner",
    "ImageFolderDataset",
    "ImageSample",
    "MVTecDataset",
    "Partitioner",
    "SyntheticConfig",
    "defects_config_to_json",
    "generate_synthetic_dataset",
    "load_defects_config",
    "parse_defects_config",
    "render_synthetic_image",
    "synthetic_defect_types",
    "synthetic_image_rng",
]
