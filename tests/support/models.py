"""Models for the tests: a LeNet-5 trained for a few seconds, the same weights on every CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lenetlab.data import normalise
from lenetlab.model import LeNet5V1, fast_forward


def quick_model(dataset, steps: int = 100) -> LeNet5V1:
    """A LeNet-5 trained for a few seconds (about 75% test accuracy): enough to have opinions.

    Trained in float64, then rounded to float32: the same weights on every CPU (float32
    training would follow the host's kernels, whose rounding 100 steps amplify into other
    weights, and other predictions of the images the tests below count)."""
    torch.manual_seed(0)
    model = LeNet5V1().double()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = normalise(dataset.train_images[:steps * 64]).double(), dataset.train_labels[:steps * 64]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps: one thread is faster, and much faster on a busy machine
    try:
        for start in range(0, len(x), 64):
            loss = F.cross_entropy(fast_forward(model, x[start:start + 64]), y[start:start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.float().eval()
