# UperNet + BiFormer-S, ADE20K 512x512, 160k iterations (paper: 49.8 mIoU), for mmsegmentation 1.x.
# Needs `pip install mmsegmentation` (and mmcv); `biformer.integrations.mm` registers the backbone.
# Without mmsegmentation, the same recipe is `biformer segment train --model upernet`.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['biformer.integrations.mm'], allow_failed_imports=False)

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='BiFormerBackbone',
        model_name='biformer_small',
        n_win=8,                  # regions per side at 512x512
        drop_path_rate=0.3,
        pretrained='checkpoints/biformer_small.safetensors',
    ),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150),
)

# AdamW lr 6e-5, weight decay 0.01 (none on norms); linear warmup over 1500 iterations from 1e-6x,
# then poly decay (power 1) to 0 at 160k; 16 images per iteration.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.0)}),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
