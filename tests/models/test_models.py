import torch

from cl_inversion.models import CifarResNet, IncrementalClassifier, ResNet18, SmallCNN


def test_head_growth_keeps_old_weights_and_parameter_objects():
    torch.manual_seed(0)
    net = IncrementalClassifier(SmallCNN(in_channels=1))
    net.head.grow(2)
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    before = net(x).detach().clone()
    old_params = [id(p) for p in net.head.parameters()]
    old_weight = net.head.weight.detach().clone()
    net.head.grow(3)
    after = net(x)
    assert after.shape == (4, 5)
    assert torch.equal(after[:, :2], before)
    assert torch.equal(net.head.weight[:2], old_weight)
    assert [id(p) for p in net.head.parameters()][:2] == old_params
    assert net.head.sizes == [2, 3] and net.num_classes == 5


def test_backbone_shapes_and_blocks_compose_to_forward():
    cases = [(SmallCNN(1), (2, 1, 8, 8), 128), (CifarResNet(32), (2, 3, 32, 32), 64),
             (ResNet18(), (2, 3, 32, 32), 512)]
    for backbone, shape, dim in cases:
        backbone.eval()
        x = torch.randn(shape)
        out = backbone(x)
        assert out.shape == (2, dim) and backbone.feature_dim == dim
        h = x
        for block in backbone.blocks():
            h = block(h)
        assert torch.allclose(h.mean(dim=(2, 3)), out, atol=1e-5)
    n_params = sum(p.numel() for p in CifarResNet(32).parameters())
    assert 460_000 < n_params < 470_000  # ResNet-32 has ~0.46M parameters
