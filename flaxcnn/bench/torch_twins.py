"""`flaxcnn.bench --reference torch`: the same network in PyTorch, stepped as our trainer steps.

The twin is torchvision's own constructor for the ImageNet networks (the ResNets with the
3x3 stride-1 stem and no max-pool where ours has `small_stem`), and modules written here
where torchvision has none: He et al.'s CIFAR ResNets with the same zero-padding (option A)
shortcuts as ours, their plain twins, and LeNet-5. It must have exactly our number of
trainable parameters, or the comparison would mean nothing.

Its step is our trainer's default: SGD with Nesterov momentum 0.9 at the same scaled
learning rate, weight decay only on the tensors of more than one dimension (param groups,
as `optim.decay_mask`), cross-entropy, train mode (BatchNorm momentum 0.1, Flax's 0.9),
on the same synthetic batch (NCHW, torch's default layout). bfloat16 is `torch.autocast`:
convolutions and matrix products in bfloat16, parameters and optimizer state float32, as
ours. The learning rate stays at its peak (our schedule's value costs nothing). torch's
thread count is its default, recorded with the results.

Import this module only where torch and torchvision import (`planning.reference_module` checks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from flaxcnn import cli
from flaxcnn.bench.figures import run_figures
from flaxcnn.bench.twin_names import CIFAR, check_supported
from flaxcnn.training.build import Network
from flaxcnn.training.optim import OptimizerSettings

WARMUP_STEPS = 1  # untimed calls after the first one, as for ours


# -- the twins ---------------------------------------------------------------------------


class CifarBlock(nn.Module):
    """Two 3x3 convolutions; shortcut "A" (identity, subsampled and zero-padded) or none."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra, self.shortcut = stride, cout - cin, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if not self.shortcut:
            return F.relu(y)
        if self.stride != 1 or self.extra:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))
        return F.relu(y + x)


class CifarResNet(nn.Module):
    """He et al. 2016, section 4.2: 3x3 stem of 16, three stages of n blocks, 16/32/64."""

    def __init__(self, depth: int, num_classes: int, shortcut: bool, in_channels: int = 3):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for j in range(n):
                stride = 2 if stage > 0 and j == 0 else 1
                blocks.append(CifarBlock(cin, width, stride, shortcut))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class LeNet5(nn.Module):
    """flaxcnn's default LeNet-5: 5x5 convs of 6 and 16 with ReLU and 2x2 max-pools, 120-84."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, 6, 5)
        self.c3 = nn.Conv2d(6, 16, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.f5 = nn.Linear(16 * side * side, 120)
        self.f6 = nn.Linear(120, 84)
        self.output = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        x = F.relu(self.f5(x.flatten(1)))
        return self.output(F.relu(self.f6(x)))


def _torchvision(network: Network) -> nn.Module:
    kwargs: dict[str, Any] = {"weights": None, "num_classes": network.num_classes}
    if network.arch == "googlenet":  # ours has no auxiliary heads unless asked
        kwargs.update(aux_logits=False, init_weights=True, transform_input=False)
    model = getattr(torchvision.models, network.arch)(**kwargs)
    if network.options.get("small_stem"):  # as ResNet.small_stem: 3x3/1 conv, no max-pool
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def build(network: Network) -> nn.Module:
    """The PyTorch twin of `network` (float32, on the CPU, train mode)."""
    check_supported(network)
    k, c = network.num_classes, network.in_channels
    if network.arch == "lenet5":
        model = LeNet5(k, network.image_size, c)
    elif network.arch in CIFAR:
        model = CifarResNet(CIFAR[network.arch], k, network.arch.startswith("resnet"), c)
    else:
        model = _torchvision(network)
    return model.train()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def twin(network: Network, params: int) -> nn.Module:
    """The twin, with exactly our `params` trainable parameters; else UsageError."""
    model = build(network)
    theirs = count_params(model)
    if theirs != params:
        raise cli.UsageError(
            f"--reference torch: the PyTorch {network.arch} has {theirs:,} trainable "
            f"parameters, ours {params:,}; the comparison would be meaningless"
        )
    return model


def check_twin(network: Network, params: int) -> None:
    """Everything `TorchSteps` needs, checked before anything is compiled or timed."""
    check_device()
    twin(network, params)


def check_device() -> str:
    """torch's device: the kind jax computes on ("cpu" or "cuda"), one device against one."""
    platform = jax.devices()[0].platform
    if platform == "cpu":
        return "cpu"
    if platform != "gpu" or not torch.cuda.is_available():
        raise cli.UsageError(
            f"--reference torch: jax computes on {platform}, where this torch cannot run"
        )
    if jax.device_count() > 1:
        raise cli.UsageError(
            "--reference torch compares one GPU with one: make one visible (CUDA_VISIBLE_DEVICES=0)"
        )
    return "cuda"


# -- the steps ---------------------------------------------------------------------------


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    """SGD, Nesterov momentum, decay on tensors of more than one dimension (optim.decay_mask)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)


class TorchSteps:
    """The twin, its optimizer and one batch on its device, timed on demand."""

    def __init__(
        self,
        network: Network,
        params: int,
        batch: dict[str, np.ndarray],
        steps: int,
        tx: OptimizerSettings,
    ):
        """`params`: ours, which the twin must have; `tx`: our optimizer's settings, with
        the momentum 0.9 of `optim.make_optimizer`."""
        self.device = check_device()
        self.steps, self.bf16 = steps, network.dtype == "bfloat16"
        start = time.perf_counter()
        self.model = twin(network, params).to(self.device)
        self.optimizer = make_optimizer(self.model, tx.peak_lr, tx.weight_decay, momentum=0.9)
        images = np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))  # NHWC -> NCHW
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(batch["label"].astype(np.int64)).to(self.device)
        self.batch_size = len(batch["label"])
        self.lr, self.weight_decay = tx.peak_lr, tx.weight_decay
        self._sync()
        self.init_sec = time.perf_counter() - start

    def _autocast(self):
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.model(self.images)
            loss = F.cross_entropy(logits, self.labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def eval_step(self) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            logits = self.model(self.images)
            loss = F.cross_entropy(logits.float(), self.labels, reduction="sum")
            return torch.stack([loss, (logits.argmax(1) == self.labels).sum().float()])

    def _timed(self, fn: Callable[[], Any], calls: int) -> tuple[Any, float]:
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn()
        self._sync()
        return out, time.perf_counter() - start

    def warm_up(self) -> dict[str, float]:
        """The first calls (the analogue of our compile), then the untimed warm-up calls."""
        _, first_train = self._timed(self.train_step, 1)
        self._timed(self.train_step, WARMUP_STEPS)
        self.model.eval()
        _, first_eval = self._timed(self.eval_step, 1)
        self._timed(self.eval_step, WARMUP_STEPS)
        self.model.train()
        return {"first_train_step_sec": first_train, "first_eval_step_sec": first_eval}

    def timed_run(self) -> dict[str, float]:
        """`steps` train steps, then `steps` eval steps (eval mode), each timed as a whole."""
        loss, train_sec = self._timed(self.train_step, self.steps)
        self.model.eval()
        _, eval_sec = self._timed(self.eval_step, self.steps)
        self.model.train()
        return run_figures(self.steps * self.batch_size, train_sec, eval_sec, float(loss))

    def info(self) -> dict[str, Any]:
        return {
            "torch_version": torch.__version__,
            "torchvision_version": torchvision.__version__,
            "device": self.device,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "autocast": "bfloat16" if self.bf16 else None,
            "memory_format": "NCHW (contiguous, torch's default)",
            "params": count_params(self.model),
            "optimizer": {
                "name": "SGD, nesterov, momentum 0.9",
                "lr": self.lr,
                "weight_decay": self.weight_decay,
                "weight_decay_on": "tensors with ndim > 1",
            },
            "init_sec": self.init_sec,
        }
