"""GPU checks, marked ``cuda`` (skipped when torch sees no GPU; tools/gpu_check.sh runs them), that
need torch (and triton) alone; those through mmdet/mmseg are in test_cuda_toolbox.py:

- every layer on CUDA against the float64 CPU references, forward and backward, train and eval, NCHW
  and channels_last, float32 and (at their rounding) float16/bfloat16;
- one training step of an SN and a BCN+WS ResNet-18 (torch.nn and this package's layers) under fp16
  autocast with GradScaler and under bf16 autocast, against the same step in float32;
- SyncSN and synchronized BCN in an NCCL process group of world size 1 equal their unsynchronized forms;
- the Triton kernels (``NORM_PLUGINS_BACKEND=auto`` on CUDA tensors) against the torch path;
- a training step of SN, SyncSN and BCN (both modes) captured in a CUDA graph and replayed, against eager.

Errors are measured against the reference's largest magnitude, at least 1 (the values compared are
O(1) or sums of them; mixture-logit gradients are small differences of such sums), so one tolerance
per dtype covers a whole tensor: 1e-5 for float32, a few units of the half types' rounding otherwise.
"""
import copy
import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from norm_plugins import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm, WSConv2d
from norm_plugins.layers.weight_standardization import FORMULAS
from norm_plugins.ops import backend, rowwise
from norm_plugins.testing import free_port
from test_batch_channel_norm import batch_moments, randomize_affine, reference_algorithm1, reference_bcn
from test_switchable_norm import randomized, reference_sn, sample
from test_weight_standardization import reference_standardize

pytestmark = pytest.mark.cuda
DEVICE = torch.device('cuda')
# dtype -> largest error allowed, relative to the reference's largest magnitude
TOLERANCES = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOLERANCES)
LAYOUTS = [torch.contiguous_format, torch.channels_last]
LAYER_SHAPE = (3, 8, 5, 6)


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 convolutions and matmuls: TF32 would round float32 results to ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def assert_near(actual, expected, tol, what):
    expected = expected.detach().double().cpu()
    error = (actual.detach().double().cpu() - expected).abs().max().item()
    bound = tol * max(expected.abs().max().item(), 1.0)
    assert error <= bound, f'{what}: max error {error:.3g} exceeds {bound:.3g}'


def on_device(x, dtype, layout=torch.contiguous_format):
    return x.to(DEVICE, dtype).contiguous(memory_format=layout)


def float64_leaf(tensor):
    return tensor.detach().cpu().double().requires_grad_()


def check_sn(layer, x, grad, tol):
    """One forward+backward of ``layer`` (on the GPU) against Eq. 2-5 in float64 on the CPU, with
    the same (dtype-rounded) input and upstream gradient; returns the reference BN statistics."""
    x64 = float64_leaf(x)
    logits = {name: float64_leaf(getattr(layer, name)) for name in ('mean_weight', 'var_weight')
              if getattr(layer, name) is not None}
    mean_r = dict(zip(layer.normalizers, torch.softmax(logits['mean_weight'], 0)))
    var_r = mean_r if layer.tied else dict(zip(layer.normalizers, torch.softmax(logits['var_weight'], 0)))
    affine = {name: float64_leaf(getattr(layer, name)) for name in ('weight', 'bias') if layer.affine}
    uses_running = not layer.training and layer.track_running_stats
    running = (layer.running_mean.cpu(), layer.running_var.cpu()) if uses_running else None
    expected, mu_bn, var_bn = reference_sn(x64, mean_r, var_r, affine.get('weight'), affine.get('bias'),
                                           layer.eps, layer.unbiased_instance_var, running)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(memory_format=torch.channels_last)
    y.backward(grad)
    expected.backward(grad.cpu().double())
    assert_near(y, expected, tol, 'output')
    assert_near(x.grad, x64.grad, tol, 'input gradient')
    for name, reference in {**logits, **affine}.items():
        assert_near(getattr(layer, name).grad, reference.grad, tol, f'{name} gradient')
    return mu_bn.detach(), var_bn.detach()


SN_CASES = {
    'SN': (SwitchableNorm, {}),
    'SN-authors': (SwitchableNorm, dict(unbiased_instance_var=True)),
    'SN-tied': (SwitchableNorm, dict(tied=True)),
    'SN-no-affine': (SwitchableNorm, dict(affine=False)),
    'SN-in-bn': (SwitchableNorm, dict(normalizers=('in', 'bn'))),
    'SN-in-ln': (SwitchableNorm, dict(normalizers=('in', 'ln'))),
    'SyncSN': (SyncSwitchableNorm, dict(unbiased_instance_var=True)),
}


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('case', list(SN_CASES))
def test_switchable_norm_matches_float64_reference(case, layout, dtype):
    cls, options = SN_CASES[case]
    layer = randomized(cls(8, momentum=0.25, **options)).to(DEVICE)
    tol = TOLERANCES[dtype]
    gen = torch.Generator().manual_seed(0)
    grads = [on_device(torch.randn(LAYER_SHAPE, generator=gen), dtype, layout) for _ in range(2)]
    mu_bn, var_bn = check_sn(layer, on_device(sample(LAYER_SHAPE), dtype, layout).requires_grad_(), grads[0], tol)
    if layer.track_running_stats:
        # Statistics accumulate in float32 whatever the input's dtype.
        assert_near(layer.running_mean, 0.25 * mu_bn, 1e-5, 'running mean')
        assert_near(layer.running_var, 0.75 + 0.25 * var_bn, 1e-5, 'running variance')
    layer.zero_grad()
    layer.eval()
    check_sn(layer, on_device(sample(LAYER_SHAPE, seed=2), dtype, layout).requires_grad_(), grads[1], tol)


@pytest.mark.parametrize('shape', [(3, 8, 7), (2, 8, 3, 2, 4)], ids=['1d', '3d'])
def test_switchable_norm_1d_and_3d_inputs(shape):
    layer = randomized(SwitchableNorm(8, unbiased_instance_var=True)).to(DEVICE)
    check_sn(layer, on_device(sample(shape), torch.float32).requires_grad_(),
             on_device(torch.randn(shape), torch.float32), TOLERANCES[torch.float32])


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('estimate', [False, True])
def test_batch_channel_norm_matches_float64_reference(estimate, layout, dtype):
    torch.manual_seed(0)
    layer = BatchChannelNorm(8, num_groups=4, estimate=estimate, update_rate=0.5, momentum=0.3)
    randomize_affine(layer)
    layer.to(DEVICE)
    tol = TOLERANCES[dtype]
    shape = LAYER_SHAPE
    for training, seed in ((True, 0), (False, 1)):
        layer.train(training)
        layer.zero_grad()
        gen = torch.Generator().manual_seed(seed)
        x = on_device(torch.randn(shape, generator=gen) * 2 + 1, dtype, layout).requires_grad_()
        grad = on_device(torch.randn(shape, generator=gen), dtype, layout)
        x64 = float64_leaf(x)
        params = [float64_leaf(p) for p in (layer.weight, layer.bias, layer.group_weight, layer.group_bias)]
        if estimate and training:
            mean, var = reference_algorithm1([x64.detach()], 0.5, 8)[0]
        elif estimate:
            mean, var = layer.estimated_mean.cpu().double(), layer.estimated_var.cpu().double()
        elif training:
            mean, var = batch_moments(x64)
        else:
            mean, var = layer.running_mean.cpu().double(), layer.running_var.cpu().double()
        expected = reference_bcn(x64, mean, var, *params, 4)
        y = layer(x)
        assert y.dtype == dtype and y.shape == shape
        assert y.is_contiguous(memory_format=layout)
        y.backward(grad)
        expected.backward(grad.cpu().double())
        assert_near(y, expected, tol, 'output')
        assert_near(x.grad, x64.grad, tol, 'input gradient')
        for name, reference in zip(('weight', 'bias', 'group_weight', 'group_bias'), params):
            assert_near(getattr(layer, name).grad, reference.grad, tol, f'{name} gradient')
        if estimate and training:
            assert_near(layer.estimated_mean, mean, 1e-5, 'estimated mean')
            assert_near(layer.estimated_var, var, 1e-5, 'estimated variance')
        elif training:
            count = shape[0] * shape[2] * shape[3]
            assert_near(layer.running_mean, 0.3 * mean, 1e-5, 'running mean')
            assert_near(layer.running_var, 0.7 + 0.3 * var * count / (count - 1), 1e-5, 'running variance')


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('formula', FORMULAS)
def test_ws_conv_matches_float64_reference(formula, layout, dtype):
    """float16/bfloat16 as under AMP: float32 weights, the convolution autocast to the half type."""
    torch.manual_seed(0)
    layer = WSConv2d(8, 6, 3, padding=1, formula=formula)
    reference = copy.deepcopy(layer).double()
    layer.to(DEVICE, memory_format=layout)
    x = on_device(torch.randn(2, 8, 7, 7), dtype, layout).requires_grad_()
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
        y = layer(x)
    assert y.dtype == dtype
    grad = torch.randn(y.shape).to(DEVICE, dtype)
    y.backward(grad)
    x64 = float64_leaf(x)
    w_hat = reference_standardize(reference.weight.detach(), formula)
    assert_near(y, F.conv2d(x64.detach(), w_hat, reference.bias.detach(), padding=1), TOLERANCES[dtype], 'output')
    # Gradients: autograd of the float64 CPU layer (its formula and gradcheck are tested on the CPU).
    reference(x64).backward(grad.cpu().double())
    for actual, expected, what in ((x.grad, x64.grad, 'input'), (layer.weight.grad, reference.weight.grad, 'weight'),
                                   (layer.bias.grad, reference.bias.grad, 'bias')):
        assert_near(actual, expected, TOLERANCES[dtype], f'{what} gradient')


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-norm pairs beside an identity or 1x1 conv-norm shortcut."""

    def __init__(self, conv, norm, in_channels, channels, stride):
        super().__init__()
        self.conv1, self.norm1 = conv(in_channels, channels, 3, stride, 1, bias=False), norm(channels)
        self.conv2, self.norm2 = conv(channels, channels, 3, 1, 1, bias=False), norm(channels)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == channels else nn.Sequential(
            conv(in_channels, channels, 1, stride, bias=False), norm(channels))

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class Classifier(nn.Sequential):
    """ResNet-18 from torch.nn and the given conv and norm (a 7x7 stem and max pooling, two basic
    blocks per stage at 64 to 512 channels), global average pooling and a 10-way linear layer. No
    norm starts at zero, so every parameter gets a gradient in the first step."""

    def __init__(self, norm, conv=nn.Conv2d):
        layers, in_channels = [conv(3, 64, 7, 2, 3, bias=False), norm(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
        for stage, channels in enumerate((64, 128, 256, 512)):
            for block in range(2):
                layers.append(BasicBlock(conv, norm, in_channels, channels, 2 if stage and not block else 1))
                in_channels = channels
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # as mmdet/torchvision ResNets start
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')


RESNETS = {
    'SN': lambda: Classifier(SwitchableNorm),
    'BCN+WS': lambda: Classifier(lambda c: BatchChannelNorm(c, num_groups=32, estimate=True),
                                 functools.partial(WSConv2d, formula='bcn')),
}
INIT_SCALE = 2.0 ** 10


def sgd_step(model, x, labels, amp_dtype=None, scaler=None):
    """One SGD step; returns the loss and every parameter's update."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.1)
    with torch.autocast(DEVICE.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x), labels)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.item(), [p.detach() - b for p, b in zip(params, before)]


# AMP dtype -> (relative loss difference, cosine of the parameter updates, relative update norm
# difference) allowed against the float32 step; the worst of both networks over seeds 0-3, measured on
# a CPU: 6e-4/6e-3, 0.993/0.925, 0.009/0.023.
AMP_TOLERANCES = {'float16': (0.01, 0.99, 0.02), 'bfloat16': (0.02, 0.85, 0.05)}


@pytest.mark.parametrize('amp', list(AMP_TOLERANCES))
@pytest.mark.parametrize('norm', list(RESNETS))
def test_amp_training_step_is_close_to_float32(norm, amp):
    torch.manual_seed(0)
    model = RESNETS[norm]().to(DEVICE).train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64, device=DEVICE)
    labels = torch.randint(0, 10, (4,), device=DEVICE)
    loss32, update32 = sgd_step(reference, x, labels)
    dtype = getattr(torch, amp)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=INIT_SCALE) if dtype == torch.float16 else None
    loss, update = sgd_step(model, x, labels, dtype, scaler)
    if scaler is not None:
        assert scaler.get_scale() == INIT_SCALE, 'GradScaler skipped the step: inf/NaN gradients'
    loss_tol, min_cosine, norm_tol = AMP_TOLERANCES[amp]
    assert math.isfinite(loss) and abs(loss - loss32) <= loss_tol * loss32
    assert all(torch.isfinite(delta).all() and (delta != 0).any() for delta in update), 'a parameter did not move'
    flat, flat32 = torch.cat([u.flatten() for u in update]), torch.cat([u.flatten() for u in update32])
    assert F.cosine_similarity(flat, flat32, dim=0) > min_cosine
    assert abs(flat.norm() / flat32.norm() - 1) < norm_tol


@pytest.fixture
def world_of_one():
    """An NCCL process group of this process alone."""
    dist.init_process_group('nccl', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# name -> (synchronized layer, the same layer unsynchronized)
SYNC_PAIRS = {
    'SyncSN': (lambda: SyncSwitchableNorm(8, unbiased_instance_var=True),
               lambda: SwitchableNorm(8, unbiased_instance_var=True)),
    'BCN-micro': (lambda: BatchChannelNorm(8, num_groups=4, estimate=True, update_rate=0.5),
                  lambda: BatchChannelNorm(8, num_groups=4, estimate=True, update_rate=0.5, sync=False)),
    'BCN-large-sync': (lambda: BatchChannelNorm(8, num_groups=4, sync=True),
                       lambda: BatchChannelNorm(8, num_groups=4)),
}


@pytest.mark.parametrize('pair', list(SYNC_PAIRS))
def test_synchronized_layers_at_world_size_one_equal_unsynchronized(world_of_one, pair):
    torch.manual_seed(0)
    synced, plain = (make().to(DEVICE) for make in SYNC_PAIRS[pair])
    with torch.no_grad():
        for p in synced.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    plain.load_state_dict(synced.state_dict())
    for step in range(2):
        x = (torch.randn(LAYER_SHAPE, device=DEVICE) * 2 + 1).requires_grad_()
        x_plain = x.detach().clone().requires_grad_()
        grad = torch.randn_like(x)
        y, y_plain = synced(x), plain(x_plain)
        y.backward(grad)
        y_plain.backward(grad)
        torch.testing.assert_close(y, y_plain)
        torch.testing.assert_close(x.grad, x_plain.grad)
        for (name, p), p_plain in zip(synced.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, p_plain.grad, msg=f'{pair} {name} gradient, step {step}')
        for (name, b), b_plain in zip(synced.named_buffers(), plain.buffers()):
            torch.testing.assert_close(b, b_plain, msg=f'{pair} {name}, step {step}')


ROW_SHAPES = {'odd-length': (3, 8, 37), 'one-position': (1, 4, 1), 'long-rows': (2, 64, 400 * 672)}


def rowwise_passes(x, grad, centre, coefficients):
    a, b, p, q = coefficients
    return {'moments': rowwise.row_moments(x), 'normalize': rowwise.row_normalize(x, centre, a, b),
            'grad_sums': rowwise.row_grad_sums(grad, x, centre),
            'backward': rowwise.row_normalize_backward(grad, x, centre, a, p, q)}


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape', list(ROW_SHAPES))
def test_triton_rowwise_passes_match_torch_path(monkeypatch, shape, channels_last, dtype):
    n, c, length = ROW_SHAPES[shape]
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def rows(offset):
        """(N, C, L) in ``dtype``, NCL-contiguous or with unit stride along C."""
        values = torch.randn(n, length, c, device=DEVICE, generator=gen) + offset
        return (values.transpose(1, 2) if channels_last else values.transpose(1, 2).contiguous()).to(dtype)

    x, grad = rows(3.0), rows(0.0)
    centre = x.float().mean(2) + 0.1 * torch.randn(n, c, device=DEVICE, generator=gen)
    coefficients = [torch.randn(n, c, device=DEVICE, generator=gen) for _ in range(4)]
    results = {}
    for name in ('auto', 'torch'):
        monkeypatch.setenv(backend.ENV_VAR, name)
        assert backend.use_triton(x) == (name == 'auto')
        results[name] = rowwise_passes(x, grad, centre, coefficients)
    for key, reference in results['torch'].items():
        actual = results['auto'][key]
        if isinstance(reference, tuple):  # (N, C) statistics, accumulated in float32
            # Sums over L carry float32 rounding of the order of their terms' sum, compared as means.
            scale = length if key == 'grad_sums' else 1
            for got, expected in zip(actual, reference):
                assert got.dtype == torch.float32
                assert_near(got / scale, expected / scale, 1e-5, key)
        else:
            assert actual.dtype == dtype and actual.stride() == x.stride(), key
            assert_near(actual, reference, TOLERANCES[dtype], key)


# The layers' wiring of the kernels; the kernels' launch plans for other shapes are tested above. One
# shape for all layer tests keeps the number of kernel compilations down.
LAYERS = {
    'SN': lambda: randomized(SwitchableNorm(8, unbiased_instance_var=True)),
    'SyncSN': lambda: randomized(SyncSwitchableNorm(8)),
    'BCN': lambda: BatchChannelNorm(8, num_groups=4),
    'BCN-micro': lambda: BatchChannelNorm(8, num_groups=4, estimate=True, update_rate=0.5),
}


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('layout', LAYOUTS)
@pytest.mark.parametrize('name', list(LAYERS))
def test_triton_layers_match_torch_path(monkeypatch, name, layout, dtype):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    if isinstance(layer, BatchChannelNorm):
        randomize_affine(layer)
    layer.to(DEVICE)
    x = sample(LAYER_SHAPE).to(DEVICE, dtype).contiguous(memory_format=layout)
    grad = torch.randn(x.shape, device=DEVICE).to(dtype)
    results = {}
    for backend_name in ('auto', 'torch'):
        monkeypatch.setenv(backend.ENV_VAR, backend_name)
        candidate = copy.deepcopy(layer)
        inp = x.clone().requires_grad_()
        y = candidate(inp)
        y.backward(grad)
        results[backend_name] = dict(output=y, input_grad=inp.grad, eval_output=candidate.eval()(x),
                                     **{f'{k} gradient': p.grad for k, p in candidate.named_parameters()},
                                     **dict(candidate.named_buffers()))
    for key, reference in results['torch'].items():
        actual = results['auto'][key]
        if reference.is_floating_point():
            assert_near(actual, reference, TOLERANCES[reference.dtype], key)
        else:
            assert torch.equal(actual, reference), key


@pytest.mark.parametrize('name', list(LAYERS))
def test_training_step_replays_from_a_cuda_graph(name):
    """A training forward+backward captured once and replayed on new data gives what eager gives:
    no host synchronization in either direction, and statistics updated on the device."""
    torch.manual_seed(0)
    layer = LAYERS[name]().to(DEVICE)
    static_x = torch.randn(LAYER_SHAPE, device=DEVICE, requires_grad=True)
    static_grad = torch.randn(LAYER_SHAPE, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels and settles lazy state before capture
        for _ in range(3):
            layer(static_x).backward(static_grad)
    torch.cuda.current_stream().wait_stream(side)
    eager = copy.deepcopy(layer)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
        static_y.backward(static_grad)

    x, grad = sample(LAYER_SHAPE).to(DEVICE), torch.randn(LAYER_SHAPE, device=DEVICE)
    with torch.no_grad():
        static_x.copy_(x)
        static_grad.copy_(grad)
    graph.replay()
    inp = x.clone().requires_grad_()
    eager.zero_grad(set_to_none=True)
    y = eager(inp)
    y.backward(grad)
    assert_near(static_y, y, TOLERANCES[torch.float32], 'output')
    assert_near(static_x.grad, inp.grad, TOLERANCES[torch.float32], 'input gradient')
    for key, p in eager.named_parameters():
        assert_near(dict(layer.named_parameters())[key].grad, p.grad, TOLERANCES[torch.float32], f'{key} gradient')
    for key, buf in eager.named_buffers():
        replayed = dict(layer.named_buffers())[key]
        if buf.is_floating_point():
            assert_near(replayed, buf, TOLERANCES[torch.float32], key)
        else:
            assert torch.equal(replayed, buf), key
