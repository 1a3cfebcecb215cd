"""Generic image recognition with NSN: CIFAR-10/100 (and synthetic glyphs) classification.

The seed's CIFAR experiments (method doc §2, §4): CNN-9 or ResNet backbones whose
convolutions come from the conv factory (plain, static NSL, dynamic NSL), trained with the
NSL authors' recipe; static NSNs fold into a plain CNN for inference and export.

Command line: ``fewshot-nsl train-supervised --config configs/cifar100_cnn9_plain.yaml`` and
``fewshot-nsl export --checkpoint RUN/last.pt --fold --out model.pt`` (docs/supervised.md).
"""

from fewshot_nsl.supervised.cli import register_cli
from fewshot_nsl.supervised.config import SUPERVISED_DEFAULTS, load_supervised_config
from fewshot_nsl.supervised.data import (
    ClassificationData,
    load_cifar,
    load_data,
    load_synthetic,
    read_cifar_split,
)
from fewshot_nsl.supervised.export import export_model, load_exported, load_trained_model
from fewshot_nsl.supervised.model import SupervisedNet, build_model, model_from_config
from fewshot_nsl.supervised.run import run_supervised
from fewshot_nsl.supervised.speed import compare_throughput
from fewshot_nsl.supervised.train import SupervisedTrainer, evaluate

__all__ = [
    "SUPERVISED_DEFAULTS",
    "ClassificationData",
    "SupervisedNet",
    "SupervisedTrainer",
    "build_model",
    "compare_throughput",
    "evaluate",
    "export_model",
    "load_cifar",
    "load_data",
    "load_exported",
    "load_supervised_config",
    "load_synthetic",
    "load_trained_model",
    "model_from_config",
    "read_cifar_split",
    "register_cli",
    "run_supervised",
]
