from engine.errors import InputError
from neurocat.cli import finite_float, run_options, with_runner

HELP = "features, FAISS index, kNN graph, PCA and t-SNE maps, nearest-neighbour galleries"
JOB = True
INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")


def add_arguments(p) -> None:
    p.add_argument("--layer", default="fc7", help="layer or alias to embed (spatial layers are average-pooled)")
    p.add_argument("--index", default="auto", choices=INDEX_KINDS,
                   help="FAISS index: exact flat, IVF, IVF-PQ, HNSW, or auto by dataset size")
    p.add_argument("-k", "--k", type=int, default=10, help="neighbours per image in the kNN graph")
    p.add_argument("--metric", default="cosine", choices=["cosine", "l2"],
                   help="feature distance: cosine (l2 between unit vectors; default) or raw l2")
    p.add_argument("--perplexity", type=finite_float, default=None,
                   help="t-SNE with Gaussian affinities of this perplexity (30 is the usual value) instead of the "
                        "default uniform affinities on each image's 15 nearest neighbours")


def run(args) -> dict:
    if args.k < 1 or (args.perplexity is not None and args.perplexity <= 0):
        raise InputError("-k and --perplexity must be positive")
    opts = run_options(args)
    from engine.models import cached_model

    cached_model(opts.model, opts.weights, opts.device).resolve(args.layer)  # unknown layer: one-line error
    from flows.embed import embed_flow

    return with_runner(embed_flow, opts)(opts, layer=args.layer, index=args.index, k=args.k, metric=args.metric,
                                         perplexity=args.perplexity)
