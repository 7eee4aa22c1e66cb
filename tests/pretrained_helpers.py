"""Independent models in the authors' checkpoint layouts, for the pretrained-conversion tests.

Each is a torchvision-like ResNet (7x7 stem, bottlenecks with the stride on the 3x3 conv, conv+norm
shortcut, fc), written from the papers and the authors' published layer definitions, with the norm
and conv of one release:

- SN (Switchable-Normalization): ``sn1/sn2/sn3``, weight/bias (1, C, 1, 1), running stats (1, C, 1),
  unbiased instance variance, [IN, LN, BN] logits (no BN without ``using_bn``).
- SSN (Sparse_SwitchNorm, ``SSN2d``): SN's layout and statistics with SparsestMax ratios, and
  ``mean_fixed``/``var_fixed`` (1,) flags: 1 = frozen, the one-hot ratios then stored in
  ``mean_weight``/``var_weight``; ``radius`` (1,).
- GN+WS (WeightStandardization): GroupNorm(32) under ``bn1/bn2/bn3``; WS = (W - mean) / (unbiased std + eps).
- BCN+WS (Batch-Channel-Normalization): ``bnK`` = BatchNorm2d ``pbn`` then a 32-group normalization
  with a (1, G, 1) per-group affine; WS given by the caller.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

DEPTH_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class AuthorsSN(nn.Module):
    def __init__(self, channels, using_bn=True, eps=1e-5):
        super().__init__()
        self.using_bn, self.eps = using_bn, eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3 if using_bn else 2))
        self.var_weight = nn.Parameter(torch.ones(3 if using_bn else 2))
        if using_bn:
            self.register_buffer('running_mean', torch.zeros(1, channels, 1))
            self.register_buffer('running_var', torch.zeros(1, channels, 1))

    def mixture(self):
        return F.softmax(self.mean_weight, 0), F.softmax(self.var_weight, 0)

    def forward(self, x):
        n, c, h, w = x.shape
        flat = x.view(n, c, -1)
        mean_in = flat.mean(-1, keepdim=True)
        var_in = flat.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        second = var_in + mean_in ** 2
        var_ln = second.mean(1, keepdim=True) - mean_ln ** 2
        means, variances = [mean_in, mean_ln], [var_in, var_ln]
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = second.mean(0, keepdim=True) - mean_bn ** 2
            else:
                mean_bn, var_bn = self.running_mean, self.running_var
            means.append(mean_bn)
            variances.append(var_bn)
        mean_ratio, var_ratio = self.mixture()
        mean = sum(r * m for r, m in zip(mean_ratio, means))
        var = sum(r * v for r, v in zip(var_ratio, variances))
        out = ((flat - mean) / (var + self.eps).sqrt()).view(n, c, h, w)
        return out * self.weight + self.bias


def _sparsemax(z):
    """Euclidean projection of a vector onto the simplex (sort-based)."""
    ordered, _ = torch.sort(z, descending=True)
    cumulative = torch.cumsum(ordered, 0) - 1
    ranks = torch.arange(1, len(z) + 1, dtype=z.dtype)
    support = int((ordered - cumulative / ranks > 0).sum())
    return torch.clamp(z - cumulative[support - 1] / support, min=0)


def sparsestmax_reference(z, radius):
    """SparsestMax in the two regimes the SSN conversion test uses: the sparsemax point when it lies at
    least ``radius`` from the simplex centre u, else the point at distance ``radius`` from u in the
    same direction, for radii small enough that it stays inside the simplex (asserted)."""
    w = _sparsemax(z.double())
    centre = torch.full_like(w, 1 / len(w))
    distance = float((w - centre).norm())
    if distance >= radius:
        return w
    point = centre + radius * (w - centre) / distance
    assert float(point.min()) >= 0, 'outside the regime this reference implements'
    return point


class AuthorsSSN(AuthorsSN):
    def __init__(self, channels):
        super().__init__(channels)
        self.register_buffer('mean_fixed', torch.zeros(1, dtype=torch.long))
        self.register_buffer('var_fixed', torch.zeros(1, dtype=torch.long))
        self.register_buffer('radius', torch.zeros(1))

    def ratios(self, which):
        weight = getattr(self, f'{which}_weight')
        if int(getattr(self, f'{which}_fixed')):
            return weight.double()  # the frozen one-hot ratios themselves
        return sparsestmax_reference(weight, float(self.radius))

    def mixture(self):
        return self.ratios('mean').to(self.weight.dtype), self.ratios('var').to(self.weight.dtype)


def authors_ssn_resnet(depth=50):
    return AuthorsResNet(depth, AuthorsSSN, 'sn')


@torch.no_grad()
def ssn_states_(model, radius=0.3, seed=0):
    """Trained-looking SSN states after :func:`randomize_`: layers in turn frozen (both vectors), with
    only the mean frozen, free with a sparsemax point at least ``radius`` from the centre, and free
    nearer the centre (pushed out to the sphere); one radius everywhere, as the authors set it.
    Every other fully frozen layer selects one normalizer for both vectors, IN, LN and BN in turn;
    the other frozen vectors select at random."""
    gen = torch.Generator().manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, AuthorsSSN)]
    for index, layer in enumerate(layers):
        layer.radius.fill_(radius)
        for which, frozen in (('mean', index % 4 in (0, 1)), ('var', index % 4 == 0)):
            weight, flag = getattr(layer, f'{which}_weight'), getattr(layer, f'{which}_fixed')
            flag.fill_(int(frozen))
            if frozen:
                choice = (index // 8) % 3 if index % 8 == 0 else int(torch.randint(3, (1,), generator=gen))
                weight.zero_()[choice] = 1.0
            elif index % 4 == 3:
                weight.copy_(torch.randn(3, generator=gen) * 0.05)
            else:
                while True:
                    weight.copy_(torch.randn(3, generator=gen) * 2)
                    w = _sparsemax(weight.double())
                    if float((w - 1 / 3).norm()) >= radius:
                        break
    return model


class AuthorsBCN(nn.Module):
    def __init__(self, channels, groups=32, eps=1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(1, groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, groups, 1))
        self.pbn = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.pbn(x)
        n = x.shape[0]
        grouped = out.reshape(n, self.groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, unbiased=False, keepdim=True)
        grouped = (grouped - mean) / (var + self.eps).sqrt()
        return (self.weight * grouped + self.bias).view_as(x)


def ws_unbiased_std(weight, eps=1e-5):
    """The WS authors' code and mmcv ConvWS: (W - mean) / (unbiased std + eps)."""
    flat = weight.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + eps)).view_as(weight)


def ws_bcn_code(weight, eps=1e-5):
    """The BCN authors' imagenet code: (W - mean) / sqrt(unbiased var + eps)."""
    flat = weight.flatten(1)
    centred = flat - flat.mean(1, keepdim=True)
    return (centred / (flat.var(1, keepdim=True) + eps).sqrt()).view_as(weight)


class StandardizedConv(nn.Conv2d):
    def __init__(self, *args, standardize=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.standardize = standardize

    def forward(self, x):
        return F.conv2d(x, self.standardize(self.weight), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride, make_conv, make_norm, norm_name, downsample):
        super().__init__()
        self.conv1 = make_conv(inplanes, planes, 1, 1, 0)
        self.conv2 = make_conv(planes, planes, 3, stride, 1)
        self.conv3 = make_conv(planes, planes * 4, 1, 1, 0)
        for index, width in enumerate((planes, planes, planes * 4), 1):
            setattr(self, f'{norm_name}{index}', make_norm(width))
        self.norm_name = norm_name
        self.downsample = downsample

    def forward(self, x):
        norm = lambda i: getattr(self, f'{self.norm_name}{i}')  # noqa: E731
        out = F.relu(norm(1)(self.conv1(x)))
        out = F.relu(norm(2)(self.conv2(out)))
        out = norm(3)(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AuthorsResNet(nn.Module):
    """Returns the outputs of layer1..layer4 (what mmdet's ResNet returns), plus logits via ``classify``."""

    def __init__(self, depth, make_norm, norm_name, standardize=None):
        super().__init__()

        def make_conv(cin, cout, k, stride, pad):
            if standardize is None:
                return nn.Conv2d(cin, cout, k, stride, pad, bias=False)
            return StandardizedConv(cin, cout, k, stride, pad, bias=False, standardize=standardize)

        self.conv1 = make_conv(3, 64, 7, 2, 3)
        setattr(self, f'{norm_name}1', make_norm(64))
        self.norm_name = norm_name
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), DEPTH_BLOCKS[depth]), 1):
            layers = []
            for index in range(blocks):
                stride = 2 if stage > 1 and index == 0 else 1
                downsample = None
                if index == 0:
                    downsample = nn.Sequential(make_conv(inplanes, planes * 4, 1, stride, 0), make_norm(planes * 4))
                layers.append(Bottleneck(inplanes, planes, stride, make_conv, make_norm, norm_name, downsample))
                inplanes = planes * 4
            setattr(self, f'layer{stage}', nn.Sequential(*layers))
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = F.relu(getattr(self, f'{self.norm_name}1')(self.conv1(x)))
        x = F.max_pool2d(x, 3, 2, 1)
        outs = []
        for stage in range(1, 5):
            x = getattr(self, f'layer{stage}')(x)
            outs.append(x)
        return tuple(outs)


def authors_sn_resnet(depth=50, using_bn=True):
    return AuthorsResNet(depth, lambda c: AuthorsSN(c, using_bn), 'sn')


def authors_gn_ws_resnet(depth=50, name='bn'):
    return AuthorsResNet(depth, lambda c: nn.GroupNorm(32, c), name, ws_unbiased_std)


def authors_bcn_ws_resnet(depth=50, standardize=ws_bcn_code):
    return AuthorsResNet(depth, AuthorsBCN, 'bn', standardize)


@torch.no_grad()
def randomize_(model, seed=0):
    """Random weights a trained model could have: He-scaled convs, norm affines around 1/0,
    random mixture logits, positive running variances."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        leaf = name.rsplit('.', 1)[-1]
        if tensor.dtype == torch.long:
            tensor.fill_(1000)
        elif tensor.dim() == 4 and 'conv' in name or name.endswith('downsample.0.weight'):
            fan_in = tensor[0].numel()
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * math.sqrt(2.0 / fan_in))
        elif leaf in ('mean_weight', 'var_weight'):
            tensor.copy_(torch.randn(tensor.shape, generator=gen))
        elif leaf == 'running_var':
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
        elif leaf == 'weight' and not name.startswith('fc'):
            tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
    return model


def save_authors_checkpoint(model, path, data_parallel=True, training_state=True):
    """Save like the authors' scripts: DataParallel ``module.`` keys under 'state_dict', plus
    training bookkeeping (epoch, accuracy, optimizer state)."""
    state = {('module.' + k if data_parallel else k): v for k, v in model.state_dict().items()}
    checkpoint = {'state_dict': state}
    if training_state:
        checkpoint.update(epoch=100, best_prec1=torch.tensor(76.9),
                          optimizer={'state': {}, 'param_groups': [{'lr': 0.0, 'momentum': 0.9, 'params': [0]}]})
    torch.save(checkpoint, path)
    return path
