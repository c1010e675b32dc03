"""Command line: ``python -m titans_ext demo [options]`` (also installed as ``titans-ext``)."""

import argparse

import torch

from .model.memory import PRESETS


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _parser():
    parser = argparse.ArgumentParser(prog="titans-ext", description="titans_ext command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small Titans model on long-range recall and compare it with attention alone",
        description="Trains a small Titans model and the same model without memory (sliding-window attention "
                    "only) on a synthetic recall task whose answers lie far beyond the window, then prints "
                    "recall accuracy by distance and saves a plot.")
    demo.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence (default 128)")
    demo.add_argument("--steps", type=_positive_int, default=600, help="training steps per model (default 600)")
    demo.add_argument("--block", choices=("mac", "mag", "mal", "lmm"), default="mal",
                      help="Titans block (default mal)")
    demo.add_argument("--memory", choices=("linear", "mlp"), default=None,
                      help="the Titans model's memory (default: the preset's, else linear)")
    demo.add_argument("--preset", choices=tuple(PRESETS), default=None,
                      help="MIRAS preset of the Titans model's memory (an MLP memory; --memory overrides it)")
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="torch device (default: cuda if available, else cpu)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--out", default="titans_demo.png", help="where to save the plot (default titans_demo.png)")
    demo.add_argument("--window", type=_positive_int, default=16,
                      help="attention window, or segment length for mac (default 16)")
    demo.add_argument("--pairs", type=_positive_int, default=4, help="facts per sequence (default 4)")
    demo.add_argument("--dim", type=_positive_int, default=64, help="model width (default 64)")
    demo.add_argument("--depth", type=_positive_int, default=1, help="blocks (default 1)")
    demo.add_argument("--heads", type=_positive_int, default=4, help="attention and memory heads (default 4)")
    demo.add_argument("--chunk-size", type=_positive_int, default=4, help="memory chunk size (default 4)")
    demo.add_argument("--batch-size", type=_positive_int, default=32, help="sequences per step (default 32)")
    demo.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    return parser


def _check_device(parser, name):
    """A device the demo can run on, or a parser error that says why not (no traceback)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: not a torch device: {name!r} (expected e.g. cpu, cuda, cuda:1)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check_device(parser, args.device)
        from .demo.run import run

        run(args)


if __name__ == "__main__":
    main()
