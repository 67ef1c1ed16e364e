"""The one exception type the CLI turns into a one-line message and exit code 2."""

# ends the one-line error of any asset a run cannot fetch: both ways to supply assets without a network
OFFLINE_HINT = ("without a network, supply local copies: scenario.root=DIR for the data, "
                "model.pretrained_path=FILE for the weights (or model.pretrained=false for random ones)")


class UserError(Exception):
    """Bad input from the user (config, data, files): reported in one line, no traceback."""
