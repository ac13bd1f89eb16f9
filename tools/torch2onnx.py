"""Export a backbone to ONNX: input `data` [batch, 3, H, W] in [-1, 1], output `embedding` [batch, F].

    python tools/torch2onnx.py work_dirs/ms1mv2_vit_s/model.pt --network vit_s_dp005_mask_0

onnx is optional at run time: `export_onnx` raises ImportError without it, which train.py turns into a warning.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import UserError, json_object, run_main  # noqa: E402
from utils.model_loading import load_backbone  # noqa: E402


def export_onnx(backbone, path, img_size=112, opset=18):
    """Export `backbone` (any of backbones.get_model) with a dynamic batch axis; returns `path`."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.export-based exporter translates through it)
    except ImportError:
        raise ImportError("ONNX export needs the onnx and onnxscript packages: "
                          "pip install onnx onnxscript onnxruntime") from None

    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    dummy = torch.zeros(2, 3, img_size, img_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        # torch.export-based exporter (the TorchScript one is deprecated); external_data=False keeps one file,
        # which holds up to 2 GB of weights (TransFace-L is 1.1 GB).
        torch.onnx.export(backbone, (dummy,), path, input_names=["data"], output_names=["embedding"],
                          dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, external_data=False,
                          verbose=False)
    finally:
        backbone.train(was_training)
    return path


def check_onnx(backbone, path, img_size=112, batch=3, seed=0):
    """Largest absolute difference between onnxruntime and PyTorch on a random batch."""
    import onnxruntime

    generator = torch.Generator().manual_seed(seed)
    data = torch.rand(batch, 3, img_size, img_size, generator=generator) * 2 - 1
    backbone.eval()
    with torch.inference_mode():
        expected = backbone(data.to(next(backbone.parameters()).device)).float().cpu().numpy()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"data": data.numpy()})[0]
    return float(abs(got - expected).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="backbone state_dict (.pt)")
    parser.add_argument("--network", required=True, help="backbone name, e.g. vit_s_dp005_mask_0")
    parser.add_argument("--network-kwargs", type=json_object, default={},
                        help='JSON, e.g. \'{"embed_dim": 64, "depth": 2}\'')
    parser.add_argument("--output", default=None, help="default: the checkpoint path with .onnx")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--check", action="store_true", help="compare with onnxruntime on a random batch")
    args = parser.parse_args()

    backbone = load_backbone(args.checkpoint, args.network, args.network_kwargs)
    img_size = getattr(backbone, "img_size", 112)
    output = args.output or os.path.splitext(args.checkpoint)[0] + ".onnx"
    try:
        export_onnx(backbone, output, img_size=img_size, opset=args.opset)
    except ImportError as error:  # onnx / onnxscript not installed: the message says what to install
        raise UserError(str(error)) from None
    print(f"wrote {output}")
    if args.check:
        print(f"max |onnxruntime - torch| = {check_onnx(backbone, output, img_size=img_size):.3g}")


if __name__ == "__main__":
    run_main(main)
