import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

from epsanet.downstream import fasterrcnn_epsanet_fpn, maskrcnn_epsanet_fpn, retinanet_epsanet_fpn

# small images and few proposals/samples keep the heads cheap on CPU
RCNN_KWARGS = dict(
    min_size=64, max_size=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, box_batch_size_per_image=32,
    box_detections_per_img=10)
RETINA_KWARGS = dict(min_size=64, max_size=64, topk_candidates=50, detections_per_img=10)


def _tiny_set(with_masks: bool = False):
    """Two images with one bright rectangle each: the box, its class and its mask are the targets."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for size, (x0, y0, x1, y1), label in (((64, 64), (8, 10, 40, 50), 1), ((48, 64), (20, 6, 60, 30), 2)):
        img = torch.rand(3, *size, generator=g) * 0.2
        img[:, y0:y1, x0:x1] += 0.7
        target = dict(boxes=torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), labels=torch.tensor([label]))
        if with_masks:
            mask = torch.zeros(1, *size, dtype=torch.uint8)
            mask[:, y0:y1, x0:x1] = 1
            target['masks'] = mask
        images.append(img)
        targets.append(target)
    return images, targets


@pytest.mark.parametrize('builder, cls, kwargs, loss_keys, det_keys, with_masks', [
    (fasterrcnn_epsanet_fpn, FasterRCNN, RCNN_KWARGS,
     {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}, {'boxes', 'labels', 'scores'}, False),
    pytest.param(
        maskrcnn_epsanet_fpn, MaskRCNN, RCNN_KWARGS,
        {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg', 'loss_mask'},
        {'boxes', 'labels', 'scores', 'masks'}, True, marks=pytest.mark.slow),
    pytest.param(
        retinanet_epsanet_fpn, RetinaNet, RETINA_KWARGS, {'classification', 'bbox_regression'},
        {'boxes', 'labels', 'scores'}, False, marks=pytest.mark.slow),
], ids=['fasterrcnn', 'maskrcnn', 'retinanet'])
def test_detector_train_and_eval(builder, cls, kwargs, loss_keys, det_keys, with_masks):
    model = builder('epsanet50', num_classes=3, trainable_backbone_layers=2, **kwargs)
    assert isinstance(model, cls)
    images, targets = _tiny_set(with_masks)

    model.train()
    losses = model(images, targets)
    assert set(losses) == loss_keys
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body
    assert body.layer4[0].conv2.convs[3].weight.grad.abs().sum() > 0  # trainable stage gets gradients
    assert body.layer1[0].conv2.convs[0].weight.grad is None  # frozen stage does not

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == len(images)
    for det, img in zip(detections, images):
        assert set(det) == det_keys
        n = det['boxes'].shape[0]
        assert det['boxes'].shape == (n, 4) and det['scores'].shape == (n,) and n <= 10
        if n:  # boxes are in the input image's coordinates
            assert det['boxes'][:, 2].max() <= img.shape[-1] and det['boxes'][:, 3].max() <= img.shape[-2]
        if with_masks:
            assert det['masks'].shape == (n, 1, *img.shape[-2:])


def test_detector_uses_backbone_normalisation():
    model = fasterrcnn_epsanet_fpn('epsanet50', num_classes=2, **RCNN_KWARGS)
    assert model.transform.image_mean == [0.485, 0.456, 0.406]
    assert model.transform.image_std == [0.229, 0.224, 0.225]
    custom = fasterrcnn_epsanet_fpn('epsanet50', num_classes=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert custom.transform.image_mean == [0.5] * 3


@pytest.mark.slow
def test_fasterrcnn_sgd_steps_lower_the_loss():
    """A few SGD steps on a tiny generated set lower the loss measured on the same batch.

    The RPN and ROI samplers draw random proposals, so each measurement uses the same seed.
    """
    torch.manual_seed(0)
    model = fasterrcnn_epsanet_fpn('epsanet50', num_classes=3, trainable_backbone_layers=3, **RCNN_KWARGS)
    model.train()
    images, targets = _tiny_set()

    def loss_on_batch():
        torch.manual_seed(123)
        return sum(model(images, targets).values())

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.005, momentum=0.9)
    with torch.no_grad():
        before = loss_on_batch().item()
    for _ in range(3):
        opt.zero_grad()
        loss_on_batch().backward()
        opt.step()
    with torch.no_grad():
        after = loss_on_batch().item()
    assert after < before, (before, after)
