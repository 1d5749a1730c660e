# Mask R-CNN + BiFormer-S, COCO 1x (paper: 47.8 box AP / 43.2 mask AP), for mmdetection 3.x.
# Needs `pip install mmdet` (and mmcv); `biformer.integrations.mm` registers the backbone. Train with
#   python tools/train.py configs/mmdet/mask_rcnn_biformer_small_fpn_1x_coco.py  (8 GPUs x 2 images)
# Without mmdetection, the same recipe is `biformer detect train --model mask_rcnn` (torchvision).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['biformer.integrations.mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='BiFormerBackbone',
        model_name='biformer_small',
        n_win=16,                 # regions per side at ~800x1333 (7 for 224^2 classification)
        drop_path_rate=0.2,
        norm_eval=True,           # BatchNorm statistics frozen, as in the paper
        pretrained='checkpoints/biformer_small.safetensors',  # ImageNet-1k weights, ours or the original .pth
    ),
    neck=dict(in_channels=[64, 128, 256, 512]),
)

# AdamW lr 1e-4, weight decay 0.05, none on norms; 12 epochs, lr x0.1 after epochs 8 and 11
# (the base schedule_1x, with its 500-iteration linear warmup); mixed precision as in the paper.
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.0)}),
)
