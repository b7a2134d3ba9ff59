"""Image models of the federated-distillation papers, in plain PyTorch.

Importing this package registers them in :data:`fedkd.models.MODELS`, which loads it
before its first lookup: LeNet-5, FedMD's CNNs, CIFAR ResNets (BatchNorm and GroupNorm),
VGG-9 / VGG-11, and the 32-pixel MobileNetV2 and ShuffleNetV2.
"""

from fedkd.zoo import cnn, mobile, resnet, vgg

__all__ = ["cnn", "mobile", "resnet", "vgg"]
