"""Benchmark-only models that hydra_nb.examples does not ship."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from hydra_nb.examples import SmallCNN


class BasicBlock(nn.Module):
    """A ResNet basic block without BatchNorm (hydra_nb refuses BatchNorm in training mode)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.short = nn.Conv2d(cin, cout, 1, stride=stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResNet8(nn.Module):
    """ResNet-8-sized CNN (CIFAR-style: stem 16, three stages of one basic block, 16-32-64 channels,
    no BatchNorm), ~78k parameters, for 1×32×32 inputs."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.layer3 = BasicBlock(32, 64, 2)
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SmoothCNN(SmallCNN):
    """hydra_nb.examples.SmallCNN with its kinks smoothed: GELU for ReLU, average for max pooling. The same
    layers and parameters (1,898; the same initial values for a seed), so that a training run's outcome is a
    smooth function of the data weights (with ReLU and max pooling an SGD step's gradient jumps where a unit
    or a pooling winner switches): the diagnostic model of benchmarks/replay_lds.py and replay_linearity.py."""

    def forward(self, x):
        x = F.avg_pool2d(F.gelu(self.conv1(x)), 2)
        x = F.avg_pool2d(F.gelu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))
