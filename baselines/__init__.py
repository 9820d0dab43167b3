"""Baselines: the source documents' and peers' alternatives, each an entry point over our stages or a
literal reference implementation that tests and benchmarks compare against."""


def with_opts(argv: list[str], switch: list[str]) -> list[str]:
    """argv with `switch` among its --opts (added right after --opts, wherever that is, or at the end):
    how a baseline entry point turns one of adapt.py's switches on and passes everything else through."""
    if "--opts" not in argv:
        return argv + ["--opts", *switch]
    at = argv.index("--opts") + 1
    return argv[:at] + switch + argv[at:]
