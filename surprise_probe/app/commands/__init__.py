"""The app layer: one module per ``surprise-probe`` command. Nothing below this package imports it.

Shape of a command module (copy it for a new command, then add one line to ``surprise_probe/cli.py``)::

    from surprise_probe.app.commands._common import (add_command, add_model_arguments, add_out_argument,
                                                  command_config, load_model_from_args, usage_errors)

    def add_parser(subparsers) -> None:
        parser = add_command(subparsers, "name", help="one line", description="what it measures")
        add_model_arguments(parser)                    # --model --device --dtype
        add_out_argument(parser, "output folder")       # --out --overwrite
        parser.add_argument("--n-boot", type=positive_int, default=1000, help="...")  # help shows defaults
        parser.set_defaults(func=run)

    def run(args) -> int:
        with contextlib.ExitStack() as stack:
            with usage_errors():                        # bad values/files -> exit 2, before any model loads
                data = read_...(args.input)
                claim = stack.enter_context(claim_output(args.out, "name", command_config(args),
                                                         overwrite=args.overwrite))
            if claim.finished:                           # same settings, finished earlier: nothing to do
                print(f"{args.out} holds this result already"); return 0
            model = load_model_from_args(args)
            result = library_function(model, data, ...)  # ONE library call returning a result object
            result.save(args.out)
            claim.finish()
        print(result.summary())
        return 0

Rules: parse, validate, one library call, save, print. No library logic here (it goes in a library
module with a result dataclass: ``to_dict()`` and ``save(folder)``). Errors: raise; ``cli.main``
prints one line (exit 2 for usage errors raised inside ``usage_errors()``, 1 otherwise).
Flag names are shared: ``--n-boot``, ``--seed``, ``--batch-size``, ``--out``, ``--overwrite``,
``--no-progress``, ``--model``/``--device``/``--dtype``.
"""
