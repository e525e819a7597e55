from cl_inversion.models.backbones import Backbone, CifarResNet, ResNet18, SmallCNN
from cl_inversion.models.clip import ClipBackbone
from cl_inversion.models.head import IncrementalClassifier, IncrementalLinear
from cl_inversion.models.moe_clip import MoEClipBackbone

__all__ = ["Backbone", "ClipBackbone", "CifarResNet", "ResNet18", "SmallCNN", "IncrementalClassifier",
           "IncrementalLinear", "MoEClipBackbone"]
