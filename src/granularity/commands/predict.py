"""``granularity predict``: apply a logged segmentation model to a folder of images."""

from __future__ import annotations

import argparse

from granularity.training.device import DEVICES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment new images with a logged model; write masks, overlays and QuPath GeoJSON",
        description="Apply a segmentation model logged by 'granularity segment' to every image in a folder. "
        "Writes <stem>_mask.png (0 background, class index + 1), <stem>_overlay.png and <stem>.geojson "
        "(one QuPath detection per predicted nucleus) per image.",
    )
    parser.add_argument("--model-uri", required=True, help="runs:/<run id>/model or models:/<name>/<version>")
    parser.add_argument("--images", required=True, help="folder of PNG, JPEG or TIFF images of any size")
    parser.add_argument("--out", required=True, help="output folder, created when missing")
    parser.add_argument("--tile-size", type=int, default=0, help="sliding-window size in pixels, a multiple of 32; 0 = the training tile, else 512")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} or cuda:N (default: %(default)s)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from granularity.predict import predict_folder
    from granularity.tracking.uri import resolve_tracking_uri, check_tracking_server

    import mlflow

    uri = resolve_tracking_uri()
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)

    written = predict_folder(args.model_uri, args.images, args.out, tile_size=args.tile_size or None, batch_size=args.batch_size, device=args.device)
    nuclei = sum(item.nuclei for item in written)
    print(f"wrote masks, overlays and GeoJSON for {len(written)} images ({nuclei} nuclei) to {args.out}")
    return 0
