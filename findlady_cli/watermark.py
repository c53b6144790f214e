"""``findlady watermark embed|extract``: Uchida et al. 2017 white-box watermarks.

``embed`` trains a bundled example model (``findlady_examples``) with the watermark regularizer;
``extract`` reads the key's bits from any weight file.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable

from findlady_cli import common
from findlady_cli.common import emit_json, fmt


def register(sub: argparse._SubParsersAction, add: Callable[..., argparse.ArgumentParser]) -> None:
    from findlady_cli.main import group

    wm = group(sub, "watermark", "embed or extract a white-box (Uchida) watermark",
               "Uchida et al. 2017 watermark: a secret projection of the mean weight of one layer.")
    add(wm, "embed", "train a bundled example model with a watermark",
        "Generate a secret key for LAYER and train the bundled example model with Uchida's\n"
        "regularizer. Writes the model's weights and the key (keep the key secret). Without\n"
        "--key-seed the key comes from the operating system's random source.", cmd_embed, _embed_options)
    add(wm, "extract", "read a watermark and decide whether it is there",
        "Read the key's bits from MODEL and count bit errors. Detected when the chance of so\n"
        "few errors from an unrelated model, P[Binomial(T, 1/2) <= errors], is below --alpha.\n"
        "A permutation of the layer's input channels destroys the read-out: resync first, or\n"
        "use 'findlady verify'. Exit 0 detected, 1 not detected.", cmd_extract, _extract_options)


def _embed_options(p: argparse.ArgumentParser) -> None:
    from findlady_examples.names import MODEL_NAMES, WATERMARK_STRENGTH

    p.add_argument("--model", required=True, choices=sorted(MODEL_NAMES), help="bundled example model")
    p.add_argument("--layer", required=True, help="weight tensor to watermark, e.g. conv2.weight")
    p.add_argument("--bits", type=common.positive_int, default=64, help="key length T")
    p.add_argument("--seed", type=int, default=0, help="training seed (initialisation and batch order)")
    p.add_argument("--key-seed", type=int, help="seed of the key (reproducible, hence guessable: tests only)")
    p.add_argument("--strength", type=common.nonneg, default=WATERMARK_STRENGTH, help="regularizer weight lambda")
    p.add_argument("-o", "--output", required=True, metavar="MODEL", help="where to write the trained weights")
    p.add_argument("--key-out", required=True, metavar="KEY", help="where to write the key (safetensors)")


def _extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="weight file")
    p.add_argument("--key", required=True, metavar="KEY", help="watermark key (safetensors)")
    p.add_argument("--alpha", type=common.probability, default=1e-6, help="p-value threshold")


def cmd_embed(args: argparse.Namespace) -> int:
    from findlady_core.errors import InputError
    from findlady_core.io import save_state_dict
    from findlady_core.watermark import detect, generate_key, save_key
    from findlady_examples import models, train

    paths = [args.output, args.key_out]
    if common.same_file(*paths):
        raise InputError("-o and --key-out must be different files")
    common.check_output(*paths)
    shapes = models.build(args.model).state_dict()
    key_seed = args.key_seed if args.key_seed is not None else secrets.randbits(63)
    key = generate_key(args.layer, shapes, bits=args.bits, seed=key_seed)
    model, sd = train.trained(args.model, args.seed, watermark_key=key, watermark_strength=args.strength,
                              progress=common.progress(args))
    accuracy = train.evaluate(model, train.held_out(args.model))
    wm = detect(sd, key)
    save_state_dict(sd, args.output, metadata={"findlady.model": args.model, "findlady.seed": str(args.seed)})
    save_key(key, args.key_out)
    if args.json:
        emit_json({"model": args.output, "key": args.key_out, "layer": args.layer, "accuracy": accuracy, "watermark": wm})
    else:
        print(f"wrote {args.output} ({args.model}, seed {args.seed}, held-out accuracy {100 * accuracy:.2f} %)")
        print(f"wrote {args.key_out} ({key.T} bits on {args.layer}; keep it secret)")
        print(f"watermark read back: {wm['bit_errors']}/{wm['bits']} bit errors, p-value {fmt(wm['p_value'])}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from findlady_core.watermark import detect, load_key

    sd = common.load_weights(args.model)
    key = load_key(args.key)
    wm = detect(sd, key, alpha=args.alpha)
    if args.json:
        emit_json(wm)
    else:
        print(f"watermark {'detected' if wm['detected'] else 'not detected'} on {key.layer}: "
              f"{wm['bit_errors']}/{wm['bits']} bit errors, p-value {fmt(wm['p_value'])} (alpha {args.alpha:g})")
    return 0 if wm["detected"] else 1
