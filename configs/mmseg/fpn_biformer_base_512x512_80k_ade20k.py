# Semantic FPN + BiFormer-B, ADE20K 512x512, 80k iterations (paper: 49.9 mIoU), for mmsegmentation 1.x.
_base_ = './fpn_biformer_small_512x512_80k_ade20k.py'

model = dict(
    backbone=dict(model_name='biformer_base', pretrained='checkpoints/biformer_base.safetensors'),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
