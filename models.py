"""Model zoo. Every model exposes `features(x)` (penultimate activations), `head` (the
final nn.Linear) and `blocks()` (its layers in order, for "the last k layers").

Models take normalised inputs, except the I-BAU small VGG whose released checkpoints
expect raw [0, 1] pixels (see `expects_normalized`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from constants import UserError


class Classifier(nn.Module):
    """Base: forward = head(features(x))."""

    head_name = "linear"

    @property
    def head(self) -> nn.Linear:
        return getattr(self, self.head_name)

    # Subclasses provide `features` (a method, or a module as in SmallVGG).

    def forward(self, x):
        return self.head(self.features(x))

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Ordered units, input to output; the last is the head."""
        return list(self.named_children())


# --- ResNet-18 for CIFAR (3x3 stem, no max-pool), as in kuangliu/pytorch-cifar ----------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet18(Classifier):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        make_stages(self, BasicBlock)
        self.linear = nn.Linear(512, num_classes)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def blocks(self):
        return [("stem", nn.Sequential(self.conv1, self.bn1))] + stage_units(self, 4) + [
            ("linear", self.linear)]


class PreActResNet18(Classifier):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        make_stages(self, PreActBlock)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def features(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1), 1)

    def blocks(self):
        return [("conv1", self.conv1)] + stage_units(self, 4) + [
            ("bn", self.bn), ("linear", self.linear)]


def make_stages(net, block, widths=(64, 128, 256, 512)):
    in_planes = 64
    for i, w in enumerate(widths):
        stride = 1 if i == 0 else 2
        setattr(net, f"layer{i + 1}", nn.Sequential(block(in_planes, w, stride), block(w, w, 1)))
        in_planes = w


def stage_units(net, n_stages):
    return [(f"layer{i}.{j}", m) for i in range(1, n_stages + 1)
            for j, m in enumerate(getattr(net, f"layer{i}"))]


# --- ResNet-9 (DAWNBench style, as in the corrective-unlearning bench) ---------------

def conv_bn(c_in, c_out, kernel=3, stride=1, padding=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.CELU(alpha=0.075))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.res = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x):
        return x + self.res(x)


class ResNet9(Classifier):
    head_name = "fc"

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = conv_bn(3, 64)
        self.conv2 = conv_bn(64, 128, kernel=5, stride=2, padding=2)
        self.res1 = Residual(128)
        self.conv3 = nn.Sequential(conv_bn(128, 256), nn.MaxPool2d(2))
        self.res2 = Residual(256)
        self.conv4 = conv_bn(256, 128, padding=0)
        self.fc = nn.Linear(128, num_classes, bias=False)

    def features(self, x):
        x = self.conv4(self.res2(self.conv3(self.res1(self.conv2(self.conv1(x))))))
        return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)


# --- Wide ResNet-28-10 (pre-activation blocks) ---------------------------------------

class WideBasic(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride, 1, bias=True)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=True)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (self.shortcut(x) if self.shortcut is not None else x)


class WideResNet(Classifier):
    def __init__(self, num_classes=10, depth=28, widen=10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=True)
        c_in = widths[0]
        for i, (w, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            layer = nn.Sequential(*[WideBasic(c_in if j == 0 else w, w, stride if j == 0 else 1)
                                    for j in range(n)])
            setattr(self, f"layer{i + 1}", layer)
            c_in = w
        self.bn = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def features(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def blocks(self):
        units = [("conv1", self.conv1)]
        return units + stage_units(self, 3) + [("bn", self.bn), ("linear", self.linear)]


# --- The I-BAU release's small VGG: exact state-dict layout (features.N / classifier) ---

class SmallVGG(Classifier):
    """Keys read features.0.weight ... features.21.*, classifier.*; `features` is the
    Sequential itself (a trailing Flatten adds no keys), so features(x) is penultimate."""

    head_name = "classifier"

    def __init__(self, num_classes=10):
        super().__init__()
        layers, c_in = [], 3
        for width, drop in ((32, 0.3), (64, 0.4), (128, 0.4)):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width),
                           nn.ELU(inplace=True)]  # inplace as released: its backward reads
                # the output, not exp(input), which underflows to slow denormals for a large δ
                c_in = width
            layers += [nn.MaxPool2d(2), nn.Dropout(drop)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(128 * 4 * 4, num_classes)

    def blocks(self):
        seq, units, start = self.features, [], 0
        for i, m in enumerate(seq):  # one unit per conv-bn-elu (pool/dropout ride along)
            if isinstance(m, nn.Conv2d) and i > start:
                units.append((f"features.{start}", nn.Sequential(*seq[start:i])))
                start = i
        units.append((f"features.{start}", nn.Sequential(*seq[start:])))
        return units + [("classifier", self.classifier)]


# --- A small fast CNN for CPU work ----------------------------------------------------

class SmallCNN(Classifier):
    """Four conv layers, each followed by pooling: ~15M multiply-adds per 32x32 image at
    width 32, about 35x cheaper than ResNet-18 (for CPU work and tests)."""

    def __init__(self, num_classes=10, width=32):
        super().__init__()
        w = width
        self.conv1 = nn.Sequential(conv_relu(3, w), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(conv_relu(w, 2 * w), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(conv_relu(2 * w, 4 * w), nn.MaxPool2d(2))
        self.conv4 = conv_relu(4 * w, 8 * w)
        self.linear = nn.Linear(8 * w, num_classes)

    def features(self, x):
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        # Max-pooled BN-ReLU features are large: scaling them by 1/8 (airbench scales its
        # logits the same way) keeps SGD at lr 0.1 from diverging in the first steps.
        return torch.flatten(F.adaptive_max_pool2d(x, 1), 1) * 0.125


def conv_relu(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


# --- timm models, wrapped to the same interface ---------------------------------------

class TimmClassifier(Classifier):
    head_name = "_head"

    def __init__(self, name, num_classes):
        super().__init__()
        import timm

        self.net = timm.create_model(name, num_classes=num_classes, pretrained=False)

    @property
    def _head(self):
        return self.net.get_classifier()

    def features(self, x):
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    def forward(self, x):
        return self.net(x)

    def blocks(self):
        return [(f"net.{n}", m) for n, m in self.net.named_children()]


# --- Registry -----------------------------------------------------------------------

MODELS = {
    "resnet18": ResNet18,
    "preactresnet18": PreActResNet18,
    "resnet9": ResNet9,
    "wrn28_10": WideResNet,
    "small_vgg": SmallVGG,
    "smallcnn": SmallCNN,
}
ALIASES = {"preact_resnet18": "preactresnet18", "preactresnet": "preactresnet18",
           "wrn": "wrn28_10", "wideresnet": "wrn28_10", "resnetwide28x10": "wrn28_10",
           "wrn_28_10": "wrn28_10", "small_vgg16": "small_vgg", "vgg_small": "small_vgg",
           "cnn": "smallcnn", "small_cnn": "smallcnn"}
RAW_INPUT_MODELS = {"small_vgg"}


def canonical_model_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return ALIASES.get(key, key)


def get_model(name: str, num_classes: int) -> Classifier:
    key = canonical_model_name(name)
    if key in MODELS:
        return MODELS[key](num_classes=num_classes)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return TimmClassifier(name, num_classes)
    hint = "" if timm is not None else " (timm is not installed, so timm names are unavailable)"
    raise UserError(f"unknown model '{name}': choose one of {', '.join(MODELS)}, "
                    f"or a timm model name{hint}")


def expects_normalized(name: str) -> bool:
    """False for models whose weights were trained on raw [0, 1] pixels."""
    return canonical_model_name(name) not in RAW_INPUT_MODELS


def count_weight_layers(module: nn.Module) -> int:
    """Convs with a spatial kernel plus Linears: what "layers" counts in last-k methods
    (1x1 shortcut convs ride with their block)."""
    return sum(1 for m in module.modules()
               if isinstance(m, nn.Linear)
               or (isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)))


def last_k_blocks(model: Classifier, k: int) -> list[tuple[str, nn.Module]]:
    """The trailing units that hold exactly the last k weight layers (k=-1: all units).

    Raises UserError listing the valid k when k does not fall on a unit boundary."""
    units = model.blocks()
    if k == -1:
        return units
    chosen, count, valid = [], 0, []
    for name, unit in reversed(units):
        count += count_weight_layers(unit)
        chosen.append((name, unit))
        valid.append(count)
        if count == k:
            return list(reversed(chosen))
    raise UserError(f"k={k} does not fall on a layer-block boundary of this model; "
                    f"valid k: -1, {', '.join(map(str, sorted(set(valid) - {0})))}")
