from neurocat.cli import finite_float, run_options, with_runner

HELP = "attribution maps (saliency, Grad-CAM, ...), their faithfulness scores and saliency-seeded masks"
JOB = True
DEFAULT_METHODS = "saliency,guided_backprop,gradcam,guided_gradcam,cam"


def add_arguments(p) -> None:
    g = p.add_argument_group("explain")
    g.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated: saliency, guided_backprop, gradcam, guided_gradcam, cam, occlusion, "
                        f"integrated_gradients, smoothgrad (default {DEFAULT_METHODS})")
    g.add_argument("--target", default="pred", help="class to explain: pred | label | a class index (default pred)")
    g.add_argument("--layer", help="Grad-CAM layer (default: the activation a GAP net pools, else last_conv)")
    g.add_argument("--ig-steps", type=int, default=64,
                   help="integrated gradients: quadrature nodes, before any refinement (default 64)")
    g.add_argument("--ig-rule", default="adaptive",
                   help="integrated gradients: quadrature rule, adaptive (default: nodes placed where the score "
                        "moves along the path, found by --ig-probes extra forward passes per image), "
                        "gausslegendre (as Captum) or riemann_left|right|middle|trapezoid")
    g.add_argument("--ig-probes", type=int, default=64,
                   help="integrated gradients, adaptive rule: forward-only probes of the path per image (default 64)")
    g.add_argument("--ig-baseline", default=0.0,
                   help="integrated gradients: baseline, a value after normalisation (default 0 = mean colour, "
                        "Captum's), black (the IG paper's), or blur (the image blurred, Gaussian sigma 16 px at "
                        "224); black and blur integrate more accurately on this net (bench/RESULTS.md)")
    g.add_argument("--ig-tolerance", type=finite_float,
                   help="integrated gradients: images whose completeness error is over this are integrated again "
                        "with twice the steps and probes, up to --ig-max-steps (default 0.01)")
    g.add_argument("--ig-max-steps", type=int,
                   help="integrated gradients: the most steps refinement doubles to (default 256; equal to --ig-steps: "
                        "no refinement)")
    g.add_argument("--smoothgrad-samples", type=int, default=16)
    g.add_argument("--smoothgrad-noise", type=finite_float, default=0.15, help="noise std / (max - min) of the image")
    g.add_argument("--occlusion-patch", type=int, default=32)
    g.add_argument("--occlusion-stride", type=int, default=16)
    g.add_argument("--occlusion-baseline", type=finite_float, default=0.0,
                   help="value of the occluder after normalisation (default 0 = mean colour)")
    g.add_argument("--faithfulness-steps", type=int, default=10,
                   help="points of the deletion/insertion curves (0: no faithfulness scores)")
    g.add_argument("--segment-with", default="auto",
                   help="method whose map seeds GrabCut masks (default: saliency if run, else the first; 'none': no masks)")
    g.add_argument("--max-images", type=int, help="explain only the first N files")


def method_params(args) -> dict:
    """Per-method keyword arguments of engine.attribution from the command line."""
    from engine.attribution import check_ig_baseline
    from engine.errors import InputError

    if args.ig_steps < 1 or args.ig_probes < 1 or args.smoothgrad_samples < 1 or args.faithfulness_steps < 0 or \
            (args.max_images is not None and args.max_images < 1):
        raise InputError("--ig-steps, --ig-probes, --smoothgrad-samples and --max-images must be positive, "
                         "--faithfulness-steps not negative")
    if (args.ig_tolerance is not None and args.ig_tolerance < 0) or \
            (args.ig_max_steps is not None and args.ig_max_steps < args.ig_steps):
        raise InputError("--ig-tolerance must not be negative, --ig-max-steps not below --ig-steps")
    refine = {"tolerance": args.ig_tolerance, "max_steps": args.ig_max_steps}  # unset: the engine's defaults
    return {
        "gradcam": {"layer": args.layer}, "guided_gradcam": {"layer": args.layer},
        "integrated_gradients": {"steps": args.ig_steps, "baseline": check_ig_baseline(args.ig_baseline),
                                 "rule": args.ig_rule, "probes": args.ig_probes,
                                 **{k: v for k, v in refine.items() if v is not None}},
        "smoothgrad": {"samples": args.smoothgrad_samples, "noise": args.smoothgrad_noise},
        "occlusion": {"patch": args.occlusion_patch, "stride": args.occlusion_stride,
                      "baseline": args.occlusion_baseline},
    }


def run(args) -> dict:
    from engine.attribution import check_ig_rule, occluder_masks, parse_methods, parse_target
    from engine.models import load_model
    from flows.explain import check_methods, explain_flow

    methods = parse_methods(args.methods)
    target = parse_target(args.target)
    params = {m: p for m, p in method_params(args).items() if m in methods}
    if "integrated_gradients" in methods:
        check_ig_rule(args.ig_rule, args.ig_steps)
    opts = run_options(args)
    model = load_model(opts.model, opts.weights, opts.device)
    if "occlusion" in methods:
        occluder_masks(model.preprocessing.crop, args.occlusion_patch, args.occlusion_stride)  # checks patch, stride
    if args.layer:
        model.resolve(args.layer)  # a clear error for a bad layer name
    segment_with = None if args.segment_with == "none" else args.segment_with
    check_methods(opts, methods, segment_with)
    return with_runner(explain_flow, opts)(opts, methods, target, params, args.faithfulness_steps, segment_with,
                                           args.max_images)
