# RetinaNet + BiFormer-S, COCO 1x (paper: 45.9 AP), for mmdetection 3.x.
# Without mmdetection, the same recipe is `biformer detect train --model retinanet` (torchvision).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['biformer.integrations.mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='BiFormerBackbone',
        model_name='biformer_small',
        n_win=16,
        drop_path_rate=0.2,
        norm_eval=True,
        pretrained='checkpoints/biformer_small.safetensors',
    ),
    # P3-P5 from stages 1-3, P6/P7 from the last backbone map ("on_input"), as in the paper
    neck=dict(in_channels=[64, 128, 256, 512], start_level=1, add_extra_convs='on_input', num_outs=5),
)

# AdamW lr 1e-4, weight decay 1e-4; 12 epochs, lr x0.1 after epochs 8 and 11.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
)
