"""The ``pfp`` command: run a compiled PFP bundle on image files.

``pfp predict BUNDLE IMAGES... [--json] [--limit N] [--threads N]`` prints, per image, its
source, the predicted class, that class's probability, the mutual information (MI), the softmax
entropy (SME) and whether it is flagged out-of-distribution; ``--json`` prints the records of
:meth:`~pfp_runtime.Prediction.to_json` with their source instead.

Exit status: 0 done, 1 an error (bad bundle, unreadable or invalid image file; one line on stderr
naming the file and the problem), 2 a usage error. Like the rest of :mod:`pfp_runtime`, it imports
numpy and TVM's FFI only (Pillow too, when a PNG is read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from pfp_runtime.bundle import BundleError
from pfp_runtime.images import Images, read_images
from pfp_runtime.predictor import THREADS_ENV, InputError, Prediction, load_bundle

__all__ = ["build_parser", "main"]

PROG = "pfp"


class _Failure(Exception):
    """An error to report on one line (exit status 1)."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run a compiled PFP bundle (a Bayesian neural network's "
                                     "probabilistic forward pass, compiled with TVM) where the model is deployed.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    predict = commands.add_parser(
        "predict", help="classify images with a bundle, with their uncertainty",
        description="Classify images with a bundle: per image the predicted class, its probability, the mutual "
                    "information (MI, the model's uncertainty), the softmax entropy (SME, the total uncertainty) and "
                    "the out-of-distribution flag (the bundle's OOD score above its threshold).",
        epilog="Image files: IDX image files (MNIST's *-idx3-ubyte, raw or .gz), .npy arrays (uint8 0-255 or float "
               "0-1; (N, 28, 28), (N, 1, 28, 28) or one (28, 28)) and PNG files (one 28x28 image each; colour is "
               "converted to grayscale, transparency composited onto black). Digits are expected white on black, "
               "as in MNIST. Exit status: 0 done, 1 error (bad bundle or image file), 2 usage error.")
    predict.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with bundle.json) or its .tar/.tar.gz archive")
    predict.add_argument("images", metavar="IMAGES", nargs="+", help="image files (IDX, .npy, PNG), read in order")
    predict.add_argument("--json", action="store_true",
                         help="print a JSON list, one record per image: source, predicted, probability, mi, sme, ood, "
                              "probs, logit_mean, logit_var")
    predict.add_argument("--limit", type=_positive, metavar="N", help="classify only the first N images")
    predict.add_argument("--threads", type=_positive, metavar="N",
                         help=f"TVM runtime threads (default: ${THREADS_ENV}, else 1)")
    predict.set_defaults(run=_predict)
    return parser


def _last_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else ""


def _table(images: Images, prediction: Prediction) -> str:
    width = max(len("source"), *(len(source) for source in images.sources))
    lines = [f"{'source':<{width}}  {'class':>5}  {'prob':>6}  {'MI':>7}  {'SME':>7}  OOD"]
    for i, source in enumerate(images.sources):
        label = int(prediction.predicted[i])
        lines.append(f"{source:<{width}}  {label:>5}  {float(prediction.probs[i, label]):>6.4f}  {float(prediction.mi[i]):>7.4f}  "
                     f"{float(prediction.sme[i]):>7.4f}  {'yes' if prediction.ood[i] else 'no'}")
    return "\n".join(lines)


def _records(images: Images, prediction: Prediction) -> list[dict]:
    return [{"source": source, **record} for source, record in zip(images.sources, prediction.to_json(), strict=True)]


def _json_lines(records: list[dict]) -> str:
    """A JSON list with one record per line (readable, greppable, and still one JSON document)."""
    return "[\n" + ",\n".join(json.dumps(record) for record in records) + "\n]"


def _predict(args: argparse.Namespace) -> str:
    try:
        images = read_images(args.images, limit=args.limit)
    except InputError as error:  # ImageFileError: names the file
        raise _Failure(str(error)) from None
    try:
        predictor = load_bundle(args.bundle, threads=args.threads)
    except (BundleError, ImportError) as error:  # ImportError: no TVM runtime library here
        raise _Failure(str(error)) from None
    except OSError as error:
        raise _Failure(f"{args.bundle}: cannot read the bundle ({error})") from None
    except Exception as error:  # noqa: BLE001 - e.g. a bundle.json without a field the predictor needs
        raise _Failure(f"{args.bundle}: cannot load the bundle ({type(error).__name__}: {error})") from None
    try:
        prediction = predictor.predict(images.pixels)
    except InputError as error:
        raise _Failure(f"{args.bundle}: the bundle refused the images ({error})") from None
    except Exception as error:  # noqa: BLE001 - the compiled code's errors come through the FFI
        raise _Failure(f"{args.bundle}: prediction failed ({type(error).__name__}: {_last_line(error)})") from None
    if args.json:
        return _json_lines(_records(images, prediction))
    return _table(images, prediction)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pfp`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        output = args.run(args)
    except _Failure as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line, always
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        print(output, flush=True)
    except BrokenPipeError:  # `pfp predict ... | head`: no more output wanted, and no error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
