# Semantic FPN + BiFormer-S, ADE20K 512x512, 80k iterations (paper: 48.9 mIoU), for mmsegmentation 1.x.
# Without mmsegmentation, the same recipe is `biformer segment train --model semantic_fpn`.
_base_ = 'mmseg::sem_fpn/fpn_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['biformer.integrations.mm'], allow_failed_imports=False)

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='BiFormerBackbone',
        model_name='biformer_small',
        n_win=8,
        drop_path_rate=0.15,
        pretrained='checkpoints/biformer_small.safetensors',
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
    decode_head=dict(num_classes=150),
)

# AdamW lr 2e-4, weight decay 1e-4; linear warmup over 1000 iterations from 0.1x, then cosine
# decay over 80k iterations; 32 images per iteration (8 GPUs x 4).
train_dataloader = dict(batch_size=4)
train_cfg = dict(max_iters=80000, val_interval=8000)
default_hooks = dict(checkpoint=dict(interval=8000))
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1000),
    dict(type='CosineAnnealingLR', T_max=79000, eta_min_ratio=1e-8, by_epoch=False, begin=1000, end=80000),
]
