"""A same-machine reference: one SGD step of MARK's CIFAR-100 KB + head in PyTorch, batch 128.

Needs torch (not in requirements.txt). Compare its time with the kb_pretrain step of
`python -m mark_jax.bench` (the same network and optimiser, all-ones masks) run in the same
minute: docs/performance.md.
"""

import time

import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(2)
model = nn.Sequential(
  nn.Conv2d(3, 64, 4),
  nn.ReLU(),
  nn.MaxPool2d(2),
  nn.Conv2d(64, 128, 3),
  nn.ReLU(),
  nn.MaxPool2d(2),
  nn.Conv2d(128, 256, 2),
  nn.ReLU(),
  nn.MaxPool2d(2),
  nn.Flatten(),
  nn.Linear(1024, 128),
  nn.ReLU(),
  nn.Dropout(0.5),
  nn.Linear(128, 5),
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
images, labels = torch.randn(128, 3, 32, 32), torch.randint(0, 5, (128,))


def step():
  optimizer.zero_grad()
  loss = nn.functional.cross_entropy(model(images), labels)
  loss.backward()
  optimizer.step()


for _ in range(5):
  step()
times = []
for _ in range(30):
  start = time.perf_counter()
  step()
  times.append(time.perf_counter() - start)
times.sort()
print(
  f"torch {torch.__version__}: KB + head SGD step, batch 128: "
  f"median {1e3 * times[15]:.1f} ms, min {1e3 * times[0]:.1f} ms"
)
