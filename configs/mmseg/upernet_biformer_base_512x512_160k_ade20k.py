# UperNet + BiFormer-B, ADE20K 512x512, 160k iterations (paper: 51.0 mIoU), for mmsegmentation 1.x.
_base_ = './upernet_biformer_small_512x512_160k_ade20k.py'

model = dict(
    backbone=dict(model_name='biformer_base', pretrained='checkpoints/biformer_base.safetensors'),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
