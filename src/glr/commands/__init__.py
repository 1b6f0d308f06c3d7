"""The `glr` commands, one module each (as DVC writes its own): `add_parser(subparsers)`
registers the command's parser and the function it runs, which imports the stage's module
only when it runs, so that `glr --help` and `glr check` stay fast."""

from glr.commands import (
    baseline,
    bench,
    evaluate,
    extract,
    params,
    prepare,
    query,
    retrieve,
    shard,
    synth,
    tag,
    train,
    visualize,
)

# in the order `glr --help` lists them: the stages, then the tools
COMMANDS = (synth, prepare, shard, train, extract, baseline, tag, retrieve, evaluate, visualize,
            query, params, bench)
