# Mask R-CNN + BiFormer-B, COCO 1x (paper: 48.6 box AP / 43.7 mask AP), for mmdetection 3.x.
_base_ = './mask_rcnn_biformer_small_fpn_1x_coco.py'

model = dict(
    backbone=dict(model_name='biformer_base', pretrained='checkpoints/biformer_base.safetensors'),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
