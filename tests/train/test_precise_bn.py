"""BatchNorm statistics recomputed for the current weights (:mod:`epsanet.train.precise_bn`)."""
import torch

from epsanet.train.precise_bn import recalibrate_bn


def test_running_stats_become_the_average_over_the_loader():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2, momentum=0.3))
    model[1].running_mean.fill_(5.0)  # stale statistics
    batches = [(torch.randn(4, 3, 8, 8) * 2 + 1, torch.zeros(4)) for _ in range(3)]
    model.eval()
    assert recalibrate_bn(model, batches, torch.device('cpu')) == 3
    with torch.no_grad():
        feats = torch.cat([model[0](x) for x, _ in batches])
    expected_mean = torch.stack([model[0](x).mean((0, 2, 3)) for x, _ in batches]).mean(0)
    torch.testing.assert_close(model[1].running_mean, expected_mean, rtol=1e-5, atol=1e-5)
    assert feats.mean((0, 2, 3)).sub(model[1].running_mean).abs().max() < 1e-4
    assert model[1].momentum == 0.1 and model[4].momentum == 0.3  # restored
    assert not model.training  # mode restored
    assert int(model[1].num_batches_tracked) == 3


def test_without_batchnorm_nothing_happens():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    assert recalibrate_bn(model, [(torch.randn(2, 3), None)], torch.device('cpu')) == 0
