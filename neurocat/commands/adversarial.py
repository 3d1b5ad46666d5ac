"""`neurocat render adversarial`: adversarial images at several eps and a robustness report.

Not a top-level command: `neurocat render` hands its `adversarial` subcommand to
`add_arguments(p)` and `run(args)` here.
"""

from __future__ import annotations

from neurocat.cli import add_common_options, run_options, with_runner

HELP = "FGSM / BIM / PGD / universal adversarial images at several eps, with a robustness report"


def add_arguments(p) -> None:
    add_common_options(p, data_required=True)
    g = p.add_argument_group("attack")
    g.add_argument("--attack", default="pgd", choices=["fgsm", "bim", "pgd", "universal"],
                   help="default pgd; universal: one perturbation per eps for the whole dataset")
    g.add_argument("--eps", default="1/255,2/255,4/255,8/255",
                   help="comma-separated budgets in [0, 1] pixel units, fractions allowed (default "
                        "1/255,2/255,4/255,8/255; for --norm l2 e.g. 0.25,0.5,1)")
    g.add_argument("--norm", default="linf", choices=["linf", "l2"])
    g.add_argument("--targeted", metavar="CLASS",
                   help="push every image to this class (index, WordNet id or name); default untargeted")
    g.add_argument("--steps", type=int, help="iterations (default: pgd 10, bim min(255*eps + 4, 1.25*255*eps), "
                                              "universal 5 sweeps)")
    g.add_argument("--step-size", help="per-step size, fractions allowed (default: pgd 2.5*eps/steps, bim 1/255, "
                                       "universal eps/10)")
    g.add_argument("--universal-images", type=int, default=64, help="images the universal perturbation is fitted on")
    g.add_argument("--no-random-start", action="store_true", help="PGD starts at the clean image")
    g.add_argument("--seed", type=int, default=0, help="seed of PGD's random start")
    g.add_argument("--transfer-model", metavar="NAME", help="also evaluate the adversarial images on this model")
    g.add_argument("--transfer-weights", metavar="FILE", help="weights of the transfer model")


def run(args) -> dict:
    from engine.attacks import parse_eps_list
    from engine.errors import InputError
    from engine.models import load_model
    from flows.adversarial import adversarial_flow, attack_spec

    # validate everything before Prefect starts: bad values exit 2 with one line
    parse_eps_list(args.eps, args.norm)
    attack_spec(args.attack, args.norm, args.steps, args.step_size, not args.no_random_start, args.targeted)
    opts = run_options(args)
    if args.transfer_weights and not args.transfer_model:
        raise InputError("--transfer-weights needs --transfer-model NAME")
    if args.transfer_model:
        load_model(args.transfer_model, args.transfer_weights, args.device)
    result = with_runner(adversarial_flow, opts)(
        opts, attack=args.attack, eps_list=args.eps, targeted=args.targeted, norm=args.norm, steps=args.steps,
        step_size=args.step_size, random_start=not args.no_random_start, seed=args.seed,
        transfer_model=args.transfer_model, transfer_weights=args.transfer_weights,
        universal_images=args.universal_images)
    per_eps = result.pop("per_eps")
    result["accuracy"] = {r["label"]: r["accuracy"] for r in per_eps}
    result["success_rate"] = {r["label"]: r["success_rate"] for r in per_eps}
    return result
