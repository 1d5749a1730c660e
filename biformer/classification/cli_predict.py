"""``biformer predict``: the top-k labels of image files (or of every image under a folder)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

if TYPE_CHECKING:  # torch loads when the command runs, so --help is instant
    import torch

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (searched recursively)")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="our .safetensors or an original checkpoint")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="expected model name; a checkpoint of another model is refused")
    parser.add_argument("--top-k", type=int, default=5, metavar="K", help="labels per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", metavar="DEVICE", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (results and skipped files)")


def find_images(inputs: List[str]) -> List[Path]:
    """Files as given; folders expanded to their image files, sorted."""
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = get_img_extensions(as_set=True)
    found: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            if not files:
                raise UserError(f"no images ({', '.join(sorted(extensions))}) under {item!r}")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"no image or folder at {item!r}")
    return found


def run(args: argparse.Namespace) -> int:
    import torch

    from ..images import open_rgb
    from ..engine.loop import log
    from .data import eval_transform
    from ..checkpoint import load_checkpoint
    from .inference import check_numbers, display_names
    from ..engine.runtime import resolve_device

    check_numbers(args, positive=("top_k", "batch_size"))
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, args.model)
    ckpt.model.eval().to(device)
    names = display_names(ckpt)
    transform = eval_transform(ckpt.data_config())
    k = min(args.top_k, ckpt.num_classes)

    readable: List[Tuple[Path, torch.Tensor]] = []
    skipped: List[Dict[str, str]] = []
    for path in find_images(args.images):
        try:
            readable.append((path, transform(open_rgb(path))))  # 16-bit images scaled, not clipped
        except Exception as e:  # a damaged file is reported, not fatal
            skipped.append({"path": str(path), "error": f"{type(e).__name__}: {e}"})
            log(f"warning: skipped unreadable image {path} ({type(e).__name__}: {e})")

    results: List[Dict[str, Any]] = []
    nonfinite = 0
    with torch.no_grad():
        for start in range(0, len(readable), args.batch_size):
            chunk = readable[start:start + args.batch_size]
            batch = torch.stack([x for _, x in chunk]).to(device)  # (B, 3, H, W)
            logits = ckpt.model(batch).float()  # (B, classes)
            nonfinite += int((~torch.isfinite(logits).all(dim=1)).sum())
            probs = logits.softmax(dim=1)
            top = probs.topk(k, dim=1)
            for (path, _), values, indices in zip(chunk, top.values.tolist(), top.indices.tolist()):
                results.append({"path": str(path), "predictions": [
                    {"label": names[i], "index": i, "probability": p} for p, i in zip(values, indices)]})

    if nonfinite:
        raise UserError(f"{nonfinite} of {len(readable)} images gave non-finite logits (NaN or inf) with "
                        f"{args.checkpoint!r}; refusing to report labels from them (diverged or damaged weights?)")
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "model": ckpt.model_name,
                          "results": results, "skipped": skipped}))
    else:
        for item in results:
            print(item["path"])
            for rank, pred in enumerate(item["predictions"], 1):
                print(f"  {rank}. {100 * pred['probability']:6.2f}%  {pred['label']}")
    return 0 if results or not skipped else 1


__all__ = ["add_arguments", "find_images", "run"]
