"""Client code generation from the worker's manifest (`lmport codegen`).

cli.py is the subcommand, common.py the helpers shared by every language and the generator contract, and one
module per language (elixir.py, node.py, go.py) turns the manifest into that client's API layer.
"""
