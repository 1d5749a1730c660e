# RetinaNet + BiFormer-B, COCO 1x (paper: 47.1 AP), for mmdetection 3.x.
_base_ = './retinanet_biformer_small_fpn_1x_coco.py'

model = dict(
    backbone=dict(model_name='biformer_base', pretrained='checkpoints/biformer_base.safetensors'),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
