"""Launch-lean layers on the kernels (Triton's interpreter on CPU tensors): forward and backward of
SN, SyncSN and BCN in at most six launches each, with at most one all-reduce and no host
synchronization; compilation stays bounded over realistic Mask R-CNN batches; 64-bit indices for
samples of 2^31+ elements; strided inputs are read in place."""
import collections
import math
import os
import random

import pytest
import torch

from interpreter import require_interpreter

require_interpreter('tests/test_triton_launches.py')

from norm_plugins.layers import BatchChannelNorm, SwitchableNorm, SyncSwitchableNorm  # noqa: E402
from norm_plugins.ops import rowwise, triton_rowwise  # noqa: E402
from norm_plugins.ops.launch_count import count_launches  # noqa: E402
from norm_plugins.ops.triton_launches import recording, specialization  # noqa: E402
from norm_plugins.testing import run_distributed  # noqa: E402

MAX_LAUNCHES = 6
LAYERS = {
    'SN': lambda c: SwitchableNorm(c),
    'SN-tied-unbiased': lambda c: SwitchableNorm(c, tied=True, unbiased_instance_var=True),
    'SN-in-ln': lambda c: SwitchableNorm(c, normalizers=('in', 'ln')),
    'SN-groups-cumulative': lambda c: SwitchableNorm(c, ratio_groups=2, momentum=None),
    'SN-bn': lambda c: SwitchableNorm(c, normalizers=('bn',)),
    'BCN': lambda c: BatchChannelNorm(c, num_groups=2),
    'BCN-micro': lambda c: BatchChannelNorm(c, num_groups=2, estimate=True),
    'BCN-no-affine': lambda c: BatchChannelNorm(c, num_groups=2, affine=False, momentum=None),
}
# An FPN level of a small image, and rows long enough to be split over several programs.
SHAPES = {'small': (2, 4, 13, 21), 'split-rows': (1, 2, 280, 250)}


@pytest.fixture(autouse=True)
def on_kernels(monkeypatch):
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'triton')


def forward_and_backward_counts(layer, x, grad):
    layer(x).backward(grad)  # first calls are not counted
    x.grad = None
    layer.zero_grad(set_to_none=True)
    outputs = []
    forward = count_launches(lambda: outputs.append(layer(x)))
    backward = count_launches(lambda: outputs[0].backward(grad))
    return forward, backward


@pytest.mark.parametrize('shape', list(SHAPES))
@pytest.mark.parametrize('name', list(LAYERS))
def test_training_step_launches_at_most_six_per_direction(name, shape):
    x = torch.randn(SHAPES[shape], requires_grad=True)
    if shape == 'split-rows':
        assert triton_rowwise.plan_for(x.flatten(2)).split > 1
    for training in (True, False):
        layer = LAYERS[name](x.shape[1]).train(training)
        forward, backward = forward_and_backward_counts(layer, x, torch.randn_like(x))
        for direction, launches in (('forward', forward), ('backward', backward)):
            assert launches.total <= MAX_LAUNCHES, (direction, training, launches)
            assert not launches.aten, (direction, launches.aten)  # all of it in the kernels
            assert launches.syncs == 0 and launches.collectives == 0, (direction, launches)


def test_torch_path_has_no_host_syncs(monkeypatch):
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', 'torch')
    x = torch.randn(SHAPES['small'], requires_grad=True)
    for make in LAYERS.values():
        forward, backward = forward_and_backward_counts(make(4), x, torch.randn_like(x))
        assert forward.syncs == backward.syncs == 0


def _sync_counts(rank, world, out_dir):
    os.environ['NORM_PLUGINS_BACKEND'] = 'triton'
    counts = {}
    for name, make in (('SyncSN', lambda: SyncSwitchableNorm(4)), ('BCN-sync', lambda: BatchChannelNorm(4, 2, sync=True)),
                       ('BCN-micro', lambda: BatchChannelNorm(4, 2, estimate=True))):
        x = torch.randn(rank + 1, 4, 5, 6, requires_grad=True)
        forward, backward = forward_and_backward_counts(make(), x, torch.randn_like(x))
        counts[name] = [(t.total, t.collectives, t.syncs) for t in (forward, backward)]
    torch.save(counts, f'{out_dir}/rank{rank}.pt')


@pytest.mark.slow
def test_synchronized_layers_launch_at_most_six_and_reduce_once_per_direction(tmp_path):
    run_distributed(_sync_counts, 2, str(tmp_path))
    for rank in range(2):
        for name, directions in torch.load(tmp_path / f'rank{rank}.pt').items():
            for total, collectives, syncs in directions:
                assert total <= MAX_LAUNCHES and collectives <= 1 and syncs == 0, (name, directions)


def mask_rcnn_norm_shapes(rng: random.Random):
    """The (N, C, H, W) of every norm call of one Mask R-CNN R50-FPN training batch of 2 images with
    norms everywhere (backbone, FPN, 4conv1fc box head, mask head), mmdet's pipeline: each image
    resized keeping its ratio to fit 1333x800, the batch padded to its largest image and to a
    multiple of 32."""
    sizes = []
    for _ in range(2):
        width, height = rng.randint(320, 640), rng.randint(240, 640)  # COCO-like originals
        scale = min(1333 / max(width, height), 800 / min(width, height))
        sizes.append((round(height * scale), round(width * scale)))
    height = math.ceil(max(h for h, _ in sizes) / 32) * 32
    width = math.ceil(max(w for _, w in sizes) / 32) * 32
    shapes = [(2, 64, height // 2, width // 2)]  # stem
    for stage, (planes, stride) in enumerate(((64, 4), (128, 8), (256, 16), (512, 32))):
        h, w = height // stride, width // stride
        shapes += [(2, planes, h * 2 if stage else h, w * 2 if stage else w),  # conv1 before the stride
                   (2, planes, h, w), (2, planes * 4, h, w)]
    for stride in (4, 8, 16, 32):  # FPN lateral and output convs
        shapes += [(2, 256, height // stride, width // stride)] * 2
    shapes += [(1024, 256, 7, 7)]  # 512 sampled RoIs per image, 4conv1fc box head
    shapes += [(rng.randint(1, 256), 256, 14, 14)]  # positive RoIs, mask head
    return shapes


@pytest.mark.slow
def test_compilation_stays_bounded_over_mask_rcnn_batches():
    """Kernel variants (Triton's specialization keys of every launch) that 200 random Mask R-CNN
    batches compile, per layer kind and kernel: at most VARIANT_BOUND each, none new after batch
    150. Launches are recorded, not run (the tensors are allocated, never touched)."""
    rng = random.Random(0)
    batches = [mask_rcnn_norm_shapes(rng) for _ in range(200)]
    for kind, make in (('SN', SwitchableNorm), ('BCN', lambda c: BatchChannelNorm(c, num_groups=32)),
                       ('BCN-micro', lambda c: BatchChannelNorm(c, num_groups=32, estimate=True))):
        layers = {}
        keys = collections.defaultdict(set)
        after_150 = None
        for index, batch in enumerate(batches):
            if index == 150:
                after_150 = {name: len(found) for name, found in keys.items()}
            for shape in sorted(set(batch)):
                layer = layers.setdefault(shape[1], make(shape[1]))
                x = torch.empty(shape, requires_grad=True)
                with recording() as launches:
                    layer(x).backward(torch.empty(shape))
                for launch in launches:
                    keys[launch.name].add(specialization(launch))
        counts = {name: len(found) for name, found in keys.items()}
        assert all(counts[name] <= VARIANT_BOUND[name] for name in counts), (kind, counts)
        assert counts == after_150, (kind, counts, after_150)


# The most variants each kernel compiled over the 200 batches, per layer kind (measured; the row
# passes are shared by SN and BCN). Before tiles were fitted to L, issue 19 counted 56 variants of
# the four passes per layer kind; now they are 48, and the coefficient kernels add 31 (SN) or 27.
VARIANT_BOUND = {'moments_kernel': 13, 'grad_sums_kernel': 13, 'normalize_kernel': 11,
                 'normalize_backward_kernel': 11, 'combine_kernel': 16, 'batch_sums_kernel': 5,
                 'sn_forward_kernel': 10, 'sn_channel_grad_kernel': 5, 'sn_sample_grad_kernel': 8,
                 'sn_ratio_grad_kernel': 3, 'bcn_forward_kernel': 8, 'bcn_sample_grad_kernel': 10,
                 'bcn_channel_grad_kernel': 4}


def test_samples_of_2_31_elements_use_64_bit_indices():
    """Channel c's row starts at c * 2^30: at c = 2 a 32-bit product wraps. The storage is 4 GiB of
    virtual memory of which only the few rows' pages are touched."""
    storage = torch.empty(2 * 2**30 + 64, dtype=torch.float16)
    x = storage.as_strided((1, 3, 16), (3 * 2**30, 2**30, 1))
    x.copy_(torch.randn(1, 3, 16) * 3 + torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1))
    assert triton_rowwise.index_flags(x)['INT64']
    mean, var = triton_rowwise.row_moments_impl(x)
    torch.testing.assert_close(mean, x.double().mean(2), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(var, x.float().var(2, correction=0), rtol=1e-3, atol=1e-3)
    centre = mean.float()
    y = triton_rowwise.row_normalize_impl(x, centre, var.rsqrt(), torch.zeros_like(centre))
    torch.testing.assert_close(y.float(), ((x.float() - centre[..., None]) * var.rsqrt()[..., None]),
                               rtol=1e-2, atol=1e-2)
    assert not triton_rowwise.index_flags(x[:, :2])['INT64']


@pytest.mark.parametrize('backend', ['triton', 'torch'])
def test_channel_slice_is_read_in_place(monkeypatch, backend):
    """A channel slice (torch.split of a wider tensor) goes to the passes as it is: the output and
    gradients equal those of a contiguous copy, and the tensor saved for backward is the slice."""
    monkeypatch.setenv('NORM_PLUGINS_BACKEND', backend)
    wide = torch.randn(2, 8, 5, 6)
    for make in (lambda: SwitchableNorm(4), lambda: BatchChannelNorm(4, num_groups=2)):
        part = wide.split(4, dim=1)[1].requires_grad_()
        copy = part.detach().contiguous().requires_grad_()
        assert not part.is_contiguous()
        layer, twin = make(), make()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(part)
        grad = torch.randn_like(y)
        y.backward(grad)
        twin(copy).backward(grad)
        torch.testing.assert_close(y, twin(copy), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(part.grad, copy.grad, rtol=1e-5, atol=1e-5)
        big = [t for t in saved if t.numel() == part.numel()]
        assert len(big) == 1 and big[0].data_ptr() == part.data_ptr(), [t.shape for t in saved]
        assert rowwise.as_rows(part)._base is not None  # a view
