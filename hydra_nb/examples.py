"""Built-in example data and models: scikit-learn's digits (shipped with scikit-learn, no network).

Used by the quickstart, the teaching notebooks, the tests and the benchmarks.
Needs the ``examples`` extra (scikit-learn).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def load_digits(image_size: int = 8, test_fraction: float = 0.2, seed: int = 0, dtype=torch.float32):
    """scikit-learn's 1,797 8×8 handwritten digits as tensors, split into train and test.

    Returns ``(x_train, y_train, x_test, y_test)``; images are (N, 1, size, size) scaled to [0, 1]
    (bilinearly resized when ``image_size`` is not 8), labels are int64 in 0..9.
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("The digits examples need scikit-learn: pip install 'hydra_nb[examples]'") from exc
    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    x = x.to(dtype)
    return x[train], y[train], x[test], y[test]


class SmallCNN(nn.Module):
    """A small CNN for 8×8 digits: conv(1→8) → conv(8→16) → linear(64→10): 1,898 parameters."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class LeNet5(nn.Module):
    """LeNet-5 for 28×28 inputs (digits resized): 61.7k parameters."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class MLP(nn.Module):
    """A one-hidden-layer MLP on flattened 8×8 digits."""

    def __init__(self, hidden: int = 32, n_classes: int = 10, n_inputs: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(n_inputs, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
